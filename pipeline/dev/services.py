"""The context managers a driver uses: `local_services` (S3 server, then a Ray head), `local_ray` (a
Ray head alone), both guarded against a killed driver (`guarded_run_dir`) and SIGTERM
(`pipeline.signals.sigterm_raises_exit`). Why they are careful about processes: see the `pipeline.dev` package doc.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from pipeline.dev.cluster import LocalCluster
from pipeline.dev.ray_head import LocalRay
from pipeline.dev.s3 import SeaweedS3
from pipeline.dev.watchdog import TOKEN_ENV, RunLock
from pipeline.signals import sigterm_raises_exit


@contextlib.contextmanager
def guarded_run_dir(run_dir: str):
    """Hold RUN_DIR for this process while inside: RUN_DIR/services.json and a watchdog process
    (pipeline.dev.watchdog) that stops the services recorded in it if this process dies without
    cleaning up (SIGKILL, OOM killer, closed terminal). Yields the RunLock: put `{TOKEN_ENV:
    lock.token}` into each service's environment and `lock.add_service(...)` once it is up.

    A folder whose services.json names a driver that still runs raises RunDirInUse; one left by a
    killed run is cleaned up first (its leftover processes are stopped, a warning says which).
    """
    lock = RunLock(run_dir).acquire()
    try:
        lock.start_watchdog()
        yield lock
    finally:
        lock.release()


def _ray(run_dir: str, nodes: int, num_cpus: int | None, env: Mapping[str, str], **kwargs) -> "LocalRay | LocalCluster":
    """One head on 127.0.0.1, or with nodes > 1 a LocalCluster (head on 127.0.0.2, nodes after it)."""
    if nodes > 1:
        return LocalCluster(run_dir, nodes=nodes, num_cpus=num_cpus, env=env, **kwargs)
    return LocalRay(run_dir, num_cpus=num_cpus, env=env, **kwargs)


def _record_ray(lock, ray: "LocalRay | LocalCluster") -> None:
    head = ray.head if isinstance(ray, LocalCluster) else ray
    lock.add_service("ray", sid=head._pgid, ports=head.ports, temp_dir=head.temp_dir,
                     fallback_temp_dir=head.uses_fallback_temp_dir)
    for node in getattr(ray, "nodes", []):
        lock.add_service(f"ray-node-{node.host}", sid=node.sid)


@contextlib.contextmanager
def local_services(
    run_dir: str,
    num_cpus: int | None = None,
    bucket: str = "rld",
    nodes: int = 1,
) -> Iterator[tuple[SeaweedS3, "LocalRay | LocalCluster"]]:
    """S3 server, then a Ray head that inherits its credentials; stopped in reverse order on exit.

    Yields (s3, ray_head): a LocalRay, or with `nodes` > 1 a LocalCluster of that many nodes with
    `num_cpus` each (pipeline.dev.cluster). While inside, os.environ holds the S3 variables (so this process's
    storage helpers and ray.init() drivers reach the server); they are restored on exit, also on
    exceptions, KeyboardInterrupt and SIGTERM (see sigterm_raises_exit). Connect a driver with
    `ray_head.connect()`.

    A driver that dies without cleaning up (SIGKILL, OOM killer, closed terminal) leaves nothing
    behind either (guarded_run_dir, pipeline.dev.watchdog): RUN_DIR/services.json records this driver
    and the services' processes while they run, and a watchdog process in a session of its own
    stops them once this process is gone. Entering on a folder whose services.json names a driver
    that still runs raises RunDirInUse; one left by a killed run is cleaned up first.
    """
    with sigterm_raises_exit(), guarded_run_dir(run_dir) as lock:
        marker = {TOKEN_ENV: lock.token}  # lets the watchdog find every service process, Ray workers too
        with SeaweedS3(run_dir, bucket=bucket, env=marker) as s3:
            lock.add_service("weed", sid=s3.pid, ports=s3.ports)
            s3.apply_env()
            head = _ray(run_dir, nodes, num_cpus, {**s3.env, **marker})
            lock.add_marker(head.temp_dir)
            with head:
                _record_ray(lock, head)
                yield s3, head


@contextlib.contextmanager
def local_ray(run_dir: str, num_cpus: int | None = None, env: Mapping[str, str] | None = None,
              nodes: int = 1, **kwargs) -> Iterator["LocalRay | LocalCluster"]:
    """`with LocalRay(run_dir, ...) as head` (a LocalCluster for nodes > 1), with local_services'
    protection against a killed driver (guarded_run_dir: RUN_DIR/services.json and a watchdog) and
    SIGTERM (sigterm_raises_exit). Other keyword arguments go to LocalRay."""
    with sigterm_raises_exit(), guarded_run_dir(run_dir) as lock:
        head = _ray(run_dir, nodes, num_cpus, {**(env or {}), TOKEN_ENV: lock.token}, **kwargs)
        lock.add_marker(head.temp_dir)
        with head:
            _record_ray(lock, head)
            yield head
