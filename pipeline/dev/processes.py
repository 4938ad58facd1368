"""Low-level helpers of local mode: free ports, environment patches, process groups and sessions
(psutil), HTTP probes, stale unix sockets."""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import signal
import socket
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping

import psutil

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


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


# ----------------------------------------------------------------------------------------- environment


def patch_environ(values: Mapping[str, str | None], saved: dict | None = None) -> dict:
    """Set (or, for None, remove) `values` in os.environ; returns what to pass to restore_environ.
    `saved` (from an earlier call) is kept, so restoring goes back to the state before the first."""
    if saved is None:
        saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return saved


def restore_environ(saved: dict | None) -> None:
    """Put back what patch_environ changed; returns None (the new `saved`)."""
    if saved:
        patch_environ(saved)


# ----------------------------------------------------------------------------------------- logs, HTTP


def log_tail(path: str, n_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return f"(no log at {path}: {e})"


def http_responds(url: str, timeout: float = 1.0) -> bool:
    """True once anything answers HTTP at `url` (an error status such as 403 counts: it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


# -------------------------------------------------------------------------------------- unix sockets


def socket_is_stale(path: str, timeout: float = 0.5) -> bool:
    """True if `path` is a unix socket nothing listens on any more (connecting is refused), or is gone.

    A socket some process still accepts on (connect succeeds, or its backlog is full), a path that
    is not a socket, or one we may not probe, is not stale.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return True
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            return e.errno in (errno.ECONNREFUSED, errno.ENOENT)
        return False


def remove_stale_sockets(paths: Iterable[str] = (), patterns: Iterable[str] = ()) -> list[str]:
    """Unlink those of `paths`, and of the files matching the glob `patterns`, that are stale unix
    sockets (socket_is_stale). Returns the removed paths.

    For the sockets a service leaves when it is killed: a socket of the same name may belong to
    another live process by now (e.g. another run that was given the same port number); that one
    answers, so it stays.
    """
    removed = []
    for path in [*paths, *(m for pattern in patterns for m in sorted(glob.glob(pattern)))]:
        if os.path.lexists(path) and socket_is_stale(path):
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed


# ----------------------------------------------------------------------------------- process groups


def _members(same: Callable[[int], bool]) -> list[int]:
    """Live (non-zombie) processes `same(pid)` says belong. Zombies are skipped: in some containers
    PID 1 does not reap orphans, and a zombie holds no port, file or memory."""
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) and same(p.pid):
                out.append(p.pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    return out


def process_group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (a service started with start_new_session)."""
    return _members(lambda pid: os.getpgid(pid) == pgid)


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid`: a Ray node's raylet, agents and workers (which have process
    groups of their own but stay in the session of the `ray start` that made the node)."""
    return _members(lambda pid: os.getsid(pid) == sid)


def process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return ""


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pgid: int, pids: list[int] | None, timeout: float) -> list[int]:
    """Wait until `pids` (or the whole group, if None) have exited; returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        members = process_group_members(pgid)
        alive = members if pids is None else [p for p in pids if p in members]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def kill_group(pgid: int, timeout: float) -> None:
    """SIGTERM the group, wait up to `timeout`, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    alive = wait_gone(pgid, None, timeout)
    if alive:
        logger.warning("process group %d: %d process(es) ignored SIGTERM, sending SIGKILL", pgid, len(alive))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        wait_gone(pgid, None, 5.0)
