"""Nothing of a run outlives its driver: a lock file in the run folder and a watchdog process.

`pipeline.dev.services.local_services` starts SeaweedFS and a Ray head in sessions of their own, so
that a Ctrl-C in the terminal reaches only the driver, which then stops them in order. A driver that dies
without running its `finally` blocks (SIGKILL, the OOM killer, SIGHUP when the terminal closes, a
crash in native code) would leave them behind: the orphaned `weed` keeps the filer lock of RUN_DIR/s3
and the next run of that folder fails. Two layers prevent that:

1. RUN_DIR/services.json (`RunLock`): written when the driver takes the folder, updated as each
   service comes up (driver and service pids with their psutil create_time, session ids, ports),
   removed on a clean stop. A driver that finds the file refuses the folder if the recorded driver
   still runs (same pid and create_time), else stops what the killed run left and carries on.
2. A watchdog (`python pipeline/dev/watchdog.py --lock RUN_DIR/services.json --token T`), started in a
   session of its own (a Ctrl-C or kill of the driver's process group does not reach it): it polls
   the driver every 0.5 s and, once the driver is gone, stops the run's processes, removes the lock
   file and exits. The driver stops it after a clean stop; it also exits on its own once the lock
   file is gone and nothing of the run is left.

Only processes of this run are ever signalled (`find_run_processes`): same user, created after the
run took the folder (and in this boot), and either recorded by (pid, create_time), or carrying the
run's random token in their environment (`TOKEN_ENV`, given to the services only), or in a recorded
service session and naming the run folder or Ray's temp dir on their command line, or a child of one
of those in the same session. Ray's workers run in process groups of their own (but in the session
`ray start` leads), hence sessions rather than process groups.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run by path (python pipeline/dev/watchdog.py): Python put pipeline/dev/ first on sys.path,
    # where its modules (s3, processes, ...) would shadow top-level names. Put the repository root
    # there instead, so `pipeline` is importable for the clean-up (pipeline.dev.s3, .ray_head).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import contextlib
import json
import logging
import secrets
import signal
import socket
import subprocess
import time

import psutil

from pipeline.dev.processes import session_members

logger = logging.getLogger(__name__)

LOCK_NAME = "services.json"
TOKEN_ENV = "RLD_SERVICES_TOKEN"  # in the environment of every service process (inherited by Ray workers)
POLL_S = 0.5
#: How long a new driver waits for the watchdog of a killed run to finish its clean-up.
WAIT_FOR_OLD_WATCHDOG_S = 45.0
#: SIGTERM waits per stop phase (`ray stop`'s order: raylet, helpers, gcs_server; then weed).
PHASE_TIMEOUTS = {"raylet": 5.0, "others": 5.0, "gcs_server": 5.0, "weed": 10.0}
_CT_TOLERANCE = 0.05  # create_time is derived from boot time + start ticks: stable, but compare loosely


class RunDirInUse(RuntimeError):
    """The run folder's services belong to a driver that is still running."""


# -------------------------------------------------------------------------------------------- processes


def identity(proc: psutil.Process) -> dict:
    """{"pid", "create_time", "name"}: what identifies a process across pid reuse."""
    with proc.oneshot():
        return {"pid": proc.pid, "create_time": proc.create_time(), "name": proc.name()}


def alive(ident: dict | None) -> psutil.Process | None:
    """The live (non-zombie) process `ident` describes, or None: a reused pid does not count."""
    if not ident:
        return None
    try:
        p = psutil.Process(int(ident["pid"]))
        if abs(p.create_time() - float(ident["create_time"])) > _CT_TOLERANCE:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def _describe(p: psutil.Process) -> str:
    try:
        with p.oneshot():
            cmd = " ".join(" ".join(p.cmdline()).split())
            return f"pid {p.pid} ({p.name()}, started {_fmt_time(p.create_time())}: {cmd[:200]})"
    except psutil.Error:
        return f"pid {p.pid}"


def processes_using(path: str, exclude: tuple[int, ...] = ()) -> list[psutil.Process]:
    """Live processes (other than this one and `exclude`) whose command line or cwd names `path`."""
    path = os.path.abspath(path)
    skip = {os.getpid(), *exclude}
    found = []
    for p in psutil.process_iter(["cmdline", "cwd", "status"]):
        try:
            if p.pid in skip or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            cwd = p.info["cwd"] or ""
            if path in cmd or cwd == path or cwd.startswith(path + os.sep):
                found.append(p)
        except psutil.Error:
            pass
    return found


def holders_hint(path: str) -> str:
    """A sentence naming processes that use `path` (e.g. an orphaned weed holding its filer lock), or ''."""
    holders = processes_using(path)
    if not holders:
        return ""
    return (f"\nprocess(es) using {path}, perhaps left by an earlier run of this folder (stop them, or use "
            f"another run folder): " + "; ".join(_describe(p) for p in holders[:5]))


def _environ_token(p: psutil.Process) -> str | None:
    try:
        return p.environ().get(TOKEN_ENV)
    except (psutil.Error, OSError):
        return None


def find_run_processes(record: dict, exclude: tuple[int, ...] = ()) -> list[psutil.Process]:
    """The live processes of the run `record` describes (see the module doc for the rules)."""
    if record.get("boot_time") and abs(record["boot_time"] - psutil.boot_time()) > 2:
        return []  # recorded in an earlier boot: nothing of it can run now
    since = float(record.get("since", 0)) - 1.0
    token = record.get("token")
    markers = [m for m in record.get("markers", []) if m]
    services = record.get("services", {})
    sessions = {int(s["sid"]) for s in services.values() if s.get("sid")}
    recorded = [p for s in services.values() for p in s.get("procs", [])]
    skip = {os.getpid(), *exclude}
    for key in ("driver", "watchdog"):
        if record.get(key):
            skip.add(int(record[key]["pid"]))
    uid = os.getuid()

    cands: dict[int, tuple[psutil.Process, int, int]] = {}  # pid -> (proc, sid, ppid)
    for p in psutil.process_iter(["ppid", "create_time", "uids", "status"]):
        try:
            info = p.info
            if p.pid in skip or info["status"] == psutil.STATUS_ZOMBIE or info["uids"].real != uid:
                continue
            if info["create_time"] < since:
                continue
            cands[p.pid] = (p, os.getsid(p.pid), info["ppid"])
        except (psutil.Error, OSError, AttributeError, TypeError):
            pass

    ours: set[int] = set()
    for pid, (p, sid, _) in cands.items():
        is_recorded = any(int(r["pid"]) == pid and abs(p.info["create_time"] - float(r["create_time"])) <= _CT_TOLERANCE
                          for r in recorded)
        if is_recorded or (token and _environ_token(p) == token):
            ours.add(pid)
            sessions.add(sid)
    for pid, (p, sid, _) in cands.items():
        if pid in ours or sid not in sessions:
            continue
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if any(m in cmd for m in markers):
            ours.add(pid)
    changed = True
    while changed:  # children (e.g. Ray workers under the raylet) in one of the run's sessions
        changed = False
        for pid, (p, sid, ppid) in cands.items():
            if pid not in ours and ppid in ours and sid in sessions:
                ours.add(pid)
                changed = True
    return [cands[pid][0] for pid in sorted(ours)]


def _phase(p: psutil.Process) -> str:
    try:
        name = p.name()
    except psutil.Error:
        return "others"
    return name if name in ("raylet", "gcs_server", "weed") else "others"


def stop_processes(procs: list[psutil.Process], timeouts: dict[str, float] | None = None) -> list[psutil.Process]:
    """SIGTERM `procs`: the Ray head phase by phase (raylet, others, gcs_server: `ray stop`'s order),
    weed meanwhile (it takes about 4 s and does not depend on Ray); SIGKILL what is left.

    psutil refuses to signal a pid that was reused since `procs` were listed. Returns the processes
    that were signalled (those that had exited already are left out).
    """
    timeouts = {**PHASE_TIMEOUTS, **(timeouts or {})}
    by_phase: dict[str, list[psutil.Process]] = {k: [] for k in PHASE_TIMEOUTS}
    for p in procs:
        by_phase[_phase(p)].append(p)

    def terminate(group: list[psutil.Process]) -> list[psutil.Process]:
        live = []
        for p in group:
            with contextlib.suppress(psutil.Error):
                p.terminate()
                live.append(p)
        return live

    t_weed = time.monotonic()
    weed = terminate(by_phase.pop("weed"))
    signalled = list(weed)
    for phase, group in [*by_phase.items(), ("weed", None)]:
        if group is None:  # weed: what is left of its timeout
            live, timeout = weed, max(0.0, timeouts["weed"] - (time.monotonic() - t_weed))
        else:
            live, timeout = terminate(group), timeouts[phase]
            signalled += live
        if live:
            t0 = time.monotonic()
            _, left = psutil.wait_procs(live, timeout=timeout)
            logger.info("stop %s: %d process(es), %.1fs, %d left", phase, len(live), time.monotonic() - t0, len(left))
    killed = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                killed.append(p)
    if killed:
        logger.warning("SIGKILL to %d process(es) left after SIGTERM: %s", len(killed), [p.pid for p in killed])
        psutil.wait_procs(killed, timeout=5)
    return signalled


def summarize(procs: list[dict]) -> str:
    """"weed (pid 12), Ray head (19 processes)" for processes ({"pid", "name"}) of a run."""
    weeds, others = [], 0
    for p in procs:
        if p.get("name") == "weed":
            weeds.append(p["pid"])
        else:
            others += 1
    parts = [f"weed (pid {', '.join(map(str, weeds))})"] if weeds else []
    if others:
        parts.append(f"Ray head ({others} process{'es' if others != 1 else ''})")
    return ", ".join(parts) or "nothing"


def stop_run(record: dict, exclude: tuple[int, ...] = ()) -> list[dict]:
    """Stop every process of the run `record` describes (rescanning for late children), then remove
    the files a clean stop would have removed. Returns the stopped processes ({"pid", "name"})."""
    stopped: list[dict] = []
    for _ in range(3):
        procs = find_run_processes(record, exclude)
        if not procs:
            break
        names = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                names[p.pid] = p.name()  # before they are gone
        stopped += [{"pid": p.pid, "name": names.get(p.pid, "?")} for p in stop_processes(procs)]
    _remove_service_files(record)
    return stopped


def _remove_service_files(record: dict) -> None:
    """weed's local sockets (a clean stop removes them) and Ray's short /tmp temp dir, its logs kept."""
    from pipeline.dev.ray_head import LocalRay
    from pipeline.dev.s3 import remove_leftover_sockets

    run_dir = record.get("run_dir")
    weed = record.get("services", {}).get("weed", {})
    remove_leftover_sockets(run_dir, (weed.get("ports") or {}).values())
    ray = record.get("services", {}).get("ray", {})
    if run_dir and ray.get("fallback_temp_dir") and os.path.isdir(ray.get("temp_dir", "")):
        try:
            head = LocalRay(run_dir)
            if head.temp_dir == ray["temp_dir"]:
                head._collect_fallback_logs()
        except Exception as e:  # noqa: BLE001 - best effort: logs only
            logger.warning("could not collect Ray's logs from %s: %s", ray.get("temp_dir"), e)


# --------------------------------------------------------------------------------------------- lock file


def lock_path(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), LOCK_NAME)


def read_record(path: str) -> dict | None:
    """The lock file's record; None if there is none; {} if it cannot be read as one."""
    try:
        with open(path) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _write_tmp(path: str, record: dict) -> str:
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return tmp


class RunLock:
    """RUN_DIR/services.json for the services of one driver (this process), and its watchdog.

        lock = RunLock(run_dir)
        lock.acquire()                 # refuses a folder in use; stops what a killed run left
        lock.start_watchdog()
        lock.add_service("weed", sid=..., ports=...)
        ...
        lock.release()                 # removes the file, stops the watchdog

    `token` goes into the services' environment (TOKEN_ENV) so the watchdog can find all their
    processes, Ray workers included, also before their session ids are recorded.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.path = lock_path(self.run_dir)
        self.token = secrets.token_hex(12)
        me = psutil.Process()
        self.record: dict = {
            "version": 1,
            "run_dir": self.run_dir,
            "token": self.token,
            "since": time.time(),
            "boot_time": psutil.boot_time(),
            "host": socket.gethostname(),
            "driver": {**identity(me), "cmdline": " ".join(" ".join(me.cmdline()).split())[:500]},
            "watchdog": None,
            "markers": [self.run_dir],
            "services": {},
        }
        self._watchdog: subprocess.Popen | None = None
        self._held = False
        #: What acquire() found and stopped of a killed run ("" if nothing).
        self.recovered = ""

    # ---- taking the folder

    def acquire(self) -> "RunLock":
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(5):
            tmp = _write_tmp(self.path, self.record)
            try:
                try:
                    os.link(tmp, self.path)  # atomic and exclusive: fails if the file exists
                except FileExistsError:
                    raise
                except OSError:  # a filesystem without hard links: exclusive create, then write
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    with os.fdopen(fd, "w") as f:
                        json.dump(self.record, f, indent=2)
                self._held = True
                return self
            except FileExistsError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self._take_over(read_record(self.path))
        raise RuntimeError(f"could not take {self.path}: another driver keeps creating it")

    def _take_over(self, old: dict | None) -> None:
        """The lock file exists: refuse if its driver runs, else clean up after it and remove it."""
        if old is None:
            return  # removed meanwhile
        if not old:
            logger.warning("%s cannot be read (a driver killed while writing it?): replacing it", self.path)
            self._unlink_if(None)
            return
        driver = old.get("driver") or {}
        if old.get("host") and old["host"] != socket.gethostname():
            # A shared folder: that host's pids mean nothing here, so whether its run is over is unknown.
            raise RunDirInUse(
                f"run folder {self.run_dir} is in use by pid {driver.get('pid')} on host {old['host']} (started "
                f"{_fmt_time(driver.get('create_time'))}); stop it or use another --run-dir "
                f"(if that run is gone, remove {self.path})"
            )
        if old.get("boot_time") and abs(old["boot_time"] - psutil.boot_time()) > 2:
            logger.warning("%s was left in an earlier boot by pid %s: replacing it", self.path, driver.get("pid"))
            self._unlink_if(old.get("token"))
            return
        if alive(driver):
            raise RunDirInUse(
                f"run folder {self.run_dir} is in use by pid {driver['pid']} (started "
                f"{_fmt_time(driver.get('create_time'))}: {driver.get('cmdline', '')[:200]}); "
                f"stop it or use another --run-dir"
            )
        watchdog = alive(old.get("watchdog"))
        if watchdog is not None:
            logger.warning("run folder %s: waiting for the watchdog (pid %d) of a killed run (driver pid %s) to stop "
                           "its services", self.run_dir, watchdog.pid, driver.get("pid"))
            with contextlib.suppress(psutil.TimeoutExpired, psutil.Error):
                watchdog.wait(WAIT_FOR_OLD_WATCHDOG_S)
            if read_record(self.path) is None:
                return  # it cleaned up and removed the file
            if alive(old.get("watchdog")):
                with contextlib.suppress(psutil.Error):
                    watchdog.kill()
        stopped = stop_run(old)
        if stopped:
            self.recovered = summarize(stopped)
            msg = (f"run folder {self.run_dir}: found services left by a killed run (driver pid {driver.get('pid')}, "
                   f"started {_fmt_time(driver.get('create_time'))}): stopped {self.recovered}")
            logger.warning(msg)  # shown on stderr also where logging is not configured (lastResort)
        else:
            logger.info("run folder %s: %s of a killed run (driver pid %s) found; none of its processes is left",
                        self.run_dir, LOCK_NAME, driver.get("pid"))
        self._unlink_if(old.get("token"))

    def _unlink_if(self, token: str | None) -> None:
        """Remove the lock file if it still holds `token` (None: whatever it holds)."""
        current = read_record(self.path)
        if current is None:
            return
        if token is None or current.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # ---- recording

    def _save(self) -> None:
        if not self._held:
            return
        tmp = _write_tmp(self.path, self.record)
        os.replace(tmp, self.path)

    def add_marker(self, marker: str) -> None:
        if marker not in self.record["markers"]:
            self.record["markers"].append(marker)
            self._save()

    def add_service(self, name: str, sid: int, ports: dict | None = None, **extra) -> None:
        """Record service `name`: its session `sid` (the pid it was started as) and its processes now."""
        procs = []
        for pid in session_members(sid):
            with contextlib.suppress(psutil.Error):
                procs.append(identity(psutil.Process(pid)))
        self.record["services"][name] = {"sid": sid, "started": time.time(), "procs": procs,
                                         "ports": dict(ports or {}), **extra}
        self._save()

    def remove_service(self, name: str) -> None:
        if self.record["services"].pop(name, None) is not None:
            self._save()

    # ---- the watchdog

    def start_watchdog(self) -> None:
        """Start the watchdog process for this driver (own session; log RUN_DIR/logs/watchdog.log)."""
        logs = os.path.join(self.run_dir, "logs")
        os.makedirs(logs, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        with open(os.path.join(logs, "watchdog.log"), "ab") as log:
            self._watchdog = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--lock", self.path, "--token", self.token],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/",
                start_new_session=True,  # a Ctrl-C or kill of the driver's group must not reach it
            )
        try:
            self.record["watchdog"] = identity(psutil.Process(self._watchdog.pid))
        except psutil.Error:
            self.record["watchdog"] = None
        self._save()
        logger.info("watchdog pid %d guards the services of run folder %s", self._watchdog.pid, self.run_dir)

    def stop_watchdog(self, timeout: float = 5.0) -> None:
        proc, self._watchdog = self._watchdog, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def release(self) -> None:
        """The services are stopped: remove the lock file (if still ours), then stop the watchdog."""
        if self._held:
            self._held = False
            self._unlink_if(self.token)
        self.stop_watchdog()


# ------------------------------------------------------------------------------------------ the watchdog


def _driver_gone(record: dict) -> bool:
    return alive(record.get("driver")) is None


def watch(lock: str, token: str, poll_s: float = POLL_S) -> int:
    """The watchdog's loop (see the module doc). Returns the exit code."""
    record = read_record(lock)
    if not record or record.get("token") != token:
        print(f"{_fmt_time(time.time())} watchdog: {lock} does not hold token {token}: nothing to guard", flush=True)
        return 0
    driver = record["driver"]
    print(f"{_fmt_time(time.time())} watchdog pid {os.getpid()}: guarding driver pid {driver['pid']} "
          f"({lock})", flush=True)
    last_scan = 0.0
    while True:
        if _driver_gone(record):
            print(f"{_fmt_time(time.time())} watchdog: driver pid {driver['pid']} is gone; stopping its services",
                  flush=True)
            t0 = time.monotonic()
            stopped = stop_run(record)
            current = read_record(lock)
            if current is not None and current.get("token") == token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
            print(f"{_fmt_time(time.time())} watchdog: stopped {summarize(stopped)} in "
                  f"{time.monotonic() - t0:.1f}s; removed {lock}", flush=True)
            return 0
        current = read_record(lock)
        if current and current.get("token") == token:
            record = current
        elif time.monotonic() - last_scan > 5.0:
            # The driver released the folder (clean stop) or someone removed the file: exit once nothing
            # of the run is left, else keep guarding with the last record.
            last_scan = time.monotonic()
            if not find_run_processes(record):
                print(f"{_fmt_time(time.time())} watchdog: {lock} released and nothing left: exiting", flush=True)
                return 0
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Stop a run's services when its driver dies.")
    p.add_argument("--lock", required=True, help="RUN_DIR/services.json")
    p.add_argument("--token", required=True, help="the run's token (in the lock file and the services' env)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s watchdog: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the driver's death (or its SIGTERM) ends us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))  # the driver's clean stop
    return watch(args.lock, args.token)


if __name__ == "__main__":
    sys.exit(main())
