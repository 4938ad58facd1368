"""A private Ray head on 127.0.0.1 (`ray start --head`, dashboard and job server), token auth of its own.

Files under RUN_DIR: logs/ray-start.log (output of `ray start`), ray/ (Ray's --temp-dir with its
session logs; see LocalRay for long paths).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from types import TracebackType

from pipeline.dev.processes import (
    HOST,
    free_ports,
    log_tail,
    patch_environ,
    process_group_members,
    process_name,
    restore_environ,
    signal_pids,
    wait_gone,
)
from pipeline.signals import reclaim_sigterm

logger = logging.getLogger(__name__)

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
        host: str = HOST,
    ) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.host = host
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
        return f"{self.host}:{self._port('port')}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self._port('dashboard-port')}"

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
        if self.host != HOST:  # a head other nodes join (pipeline.dev.cluster): Ray refuses them otherwise
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        env.pop("RAY_AUTH_TOKEN_PATH", None)  # RAY_AUTH_TOKEN wins anyway; leave no doubt which token
        env.update(self.auth_env)
        env.update({k: str(port) for k, port in self.env_ports.items()})
        if "port" in self.ports:
            # Code in workers that finds "the" cluster by itself (Ray Train's placement-group cleaner
            # asks the State API with no address) would otherwise scan the machine for GCS processes
            # and fail once another run's head is up: "Found multiple active Ray instances".
            env["RAY_ADDRESS"] = self.address
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
        self._saved_env = patch_environ({**self.auth_env, "RAY_AUTH_TOKEN_PATH": None}, saved=self._saved_env)
        _refresh_ray_auth()

    def restore_env(self) -> None:
        """Undo apply_env(). Ray's auth settings in this process are re-read only if apply_env() had
        changed anything (stop() calls this also for a head no driver connected to)."""
        if self._saved_env is None:
            return
        self._saved_env = restore_environ(self._saved_env)
        _refresh_ray_auth()

    def _command(self) -> list[str]:
        ray = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [
            ray, "start", "--head",
            "--include-dashboard=true",  # Ray Train 2.60 uses the State API; `ray job submit` needs it
            f"--dashboard-host={self.host}",
            f"--node-ip-address={self.host}",
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
        # With other nodes joining, Ray binds some of these on every interface: pick ports free there.
        picked = free_ports(len(self.PORT_FLAGS) + len(self.PORT_ENV), HOST if self.host == HOST else "0.0.0.0")
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
                        f"log {self.log_path} ends with:\n{log_tail(self.log_path)}"
                    ) from None
            if rc != 0:
                raise RuntimeError(
                    f"`ray start` failed (exit code {rc}); log {self.log_path} ends with:\n{log_tail(self.log_path)}"
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
            logger.info("ray was imported without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; keeping the driver on loopback")
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
            stop_ray_processes(pgid, self.stop_timeout)
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


def stop_ray_processes(pgid: int, timeout: float) -> None:
    """Stop the Ray processes `ray start` left in process group `pgid`, in `ray stop`'s order: raylet,
    then helpers, then gcs_server. Each step gets SIGTERM and a third of `timeout`; survivors get
    SIGKILL. (Ray's worker processes have groups of their own and exit when their raylet does.)"""
    step = timeout / 3
    members = process_group_members(pgid)
    raylets = [p for p in members if process_name(p) == "raylet"]
    gcs = [p for p in members if process_name(p) == "gcs_server"]
    others = [p for p in members if p not in raylets and p not in gcs]
    for group in (raylets, others, gcs):
        if group:
            signal_pids(group, signal.SIGTERM)
            wait_gone(pgid, group, step)
    left = process_group_members(pgid)
    if left:
        logger.debug("Ray: SIGKILL to %d process(es) of group %d left after SIGTERM", len(left), pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        wait_gone(pgid, None, 5.0)
