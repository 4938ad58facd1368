"""A Ray cluster of several nodes on one machine: a head (LocalRay) plus `ray start --address` nodes.

Each node is its own raylet in its own session and process group, on its own loopback address:
the head on 127.0.0.2, node i on 127.0.0.(2 + i). Ray allows several nodes on one machine only with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and in that mode it rewrites 127.0.0.1 (and localhost) to the
machine's outward address, but leaves the other loopback addresses alone (../shared/NOTES.md); so
127.0.0.1 is never used here. Killing a node (`kill_node`) is what a preempted VM looks like to Ray:
every process of that node dies at once, its raylet included.

Exposure: in this mode Ray binds some ports (GCS, raylets, dashboard agents, workers) on every
interface. The cluster runs with the head's per-run token auth (LocalRay), and all our traffic goes
to 127.0.0.x; single-node local mode (LocalRay on 127.0.0.1) stays loopback-only, so use this only
where several nodes are the point (tests of failures, `--nodes N` in local mode).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from types import TracebackType

from pipeline.dev.processes import log_tail, session_members
from pipeline.dev.ray_head import LocalRay, stop_ray_processes

logger = logging.getLogger(__name__)


def node_host(index: int) -> str:
    """Loopback address of node `index` (0 = the head): 127.0.0.2, 127.0.0.3, ..."""
    if not 0 <= index < 250:
        raise ValueError(f"node index {index} out of range (0..249)")
    return f"127.0.0.{2 + index}"


def kill_session(sid: int, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process of session `sid`, again for any started meanwhile (a raylet forking a
    worker), until none is left; returns the pids killed. RuntimeError if some survive `timeout`."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = session_members(sid)
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise RuntimeError(f"session {sid}: processes {pids} survived SIGKILL for {timeout:.0f}s")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed += [p for p in pids if p not in killed]
        time.sleep(0.1)


class RayNode:
    """One non-head node: `ray start --address=HEAD --node-ip-address=HOST`, started in a session of
    its own with the head's environment (its token, the S3 variables). `sid` is that session."""

    def __init__(self, head: LocalRay, host: str, num_cpus: int | None = None,
                 resources: Mapping[str, float] | None = None, start_timeout: float = 90.0,
                 stop_timeout: float = 15.0) -> None:
        self.head = head
        self.host = host
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_path = os.path.join(head.run_dir, "logs", f"ray-node-{host}.log")
        self.sid: int | None = None

    def __repr__(self) -> str:
        return f"RayNode(host={self.host!r}, sid={self.sid})"

    @property
    def running(self) -> bool:
        return self.sid is not None and bool(session_members(self.sid))

    def _command(self) -> list[str]:
        ray = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray, "start", f"--address={self.head.address}", f"--node-ip-address={self.host}",
               "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
               "--dashboard-agent-listen-port=0"]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        return cmd

    def start(self) -> "RayNode":
        if self.running:
            return self
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(self._command(), env=self.head.env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = proc.pid
        try:
            rc = proc.wait(timeout=self.start_timeout)
        except BaseException:
            self.kill()
            raise
        if rc != 0:
            self.kill()
            raise RuntimeError(f"`ray start` of node {self.host} failed (exit code {rc}); log {self.log_path} "
                               f"ends with:\n{log_tail(self.log_path)}")
        return self

    def kill(self) -> list[int]:
        """SIGKILL the whole node at once (a preempted machine); returns the pids killed."""
        sid, self.sid = self.sid, None
        return kill_session(sid) if sid is not None else []

    def stop(self) -> None:
        """Stop in `ray stop`'s order (raylet first); whatever of the node's session is left gets SIGKILL."""
        if self.sid is None:
            return
        stop_ray_processes(self.sid, self.stop_timeout)
        self.kill()


class LocalCluster:
    """A head and `nodes - 1` more nodes on loopback addresses; each node gets `num_cpus` CPUs.

    `address`, `dashboard_url`, `env`, `auth_env`, `connect()` are the head's (see LocalRay).
    `kill_node(i)` SIGKILLs node i (1..nodes-1) as a preemption would; `start_node(i)` brings a
    replacement up on the same address, as an autoscaler would.
    """

    def __init__(self, run_dir: str, nodes: int = 2, num_cpus: int | None = None,
                 env: Mapping[str, str] | None = None, **head_kwargs) -> None:
        if nodes < 2:
            raise ValueError("a LocalCluster has at least 2 nodes; use LocalRay for one")
        self.head = LocalRay(run_dir, num_cpus=num_cpus, env=env, host=node_host(0), **head_kwargs)
        self.nodes = [RayNode(self.head, node_host(i), num_cpus) for i in range(1, nodes)]

    def __repr__(self) -> str:
        return f"LocalCluster(head={self.head!r}, nodes={self.nodes!r})"

    address = property(lambda self: self.head.address)
    dashboard_url = property(lambda self: self.head.dashboard_url)
    env = property(lambda self: self.head.env)
    auth_env = property(lambda self: self.head.auth_env)
    temp_dir = property(lambda self: self.head.temp_dir)

    def connect(self, **init_kwargs) -> None:
        self.head.connect(**init_kwargs)

    def start(self) -> "LocalCluster":
        try:
            self.head.start()
            for node in self.nodes:
                node.start()
            self.wait_alive(len(self.nodes) + 1)
        except BaseException:
            self.stop()
            raise
        logger.info("Ray cluster ready: %d nodes, head %s", len(self.nodes) + 1, self.address)
        return self

    def _state(self, what: str, query: str = "") -> list[dict]:
        """Rows of Ray's State API (`/api/v0/<what>`), asked with this cluster's token."""
        url = f"{self.dashboard_url}/api/v0/{what}?limit=10000{query}"
        request = urllib.request.Request(url, headers=self.head.auth_headers)
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)["data"]["result"]["result"]

    def alive_nodes(self) -> dict[str, str]:
        """node id -> address of the nodes the head's GCS reports alive. A killed node stays "alive"
        here until the GCS misses its heartbeats (seconds)."""
        return {n["node_id"]: n["node_ip"] for n in self._state("nodes", "&detail=false") if n["state"] == "ALIVE"}

    def actor_hosts(self, name: str) -> list[str]:
        """Addresses of the nodes that ran actors whose class or repr names `name`, dead ones included
        (one entry each). Ray Data's pool actors are `_MapWorker`s with repr `MapWorker(MapBatches(<UDF>))`."""
        hosts = {n["node_id"]: n["node_ip"] for n in self._state("nodes", "&detail=false")}
        return sorted(hosts.get(a.get("node_id"), "?") for a in self._state("actors", "&detail=true")
                      if name in (a.get("class_name") or "") or name in (a.get("repr_name") or ""))

    def _wait(self, done, what: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                last = self.alive_nodes()
                if done(last):
                    return last
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray cluster at {self.address}: {what} after {timeout:.0f}s (last: {last})")
            time.sleep(0.5)

    def wait_alive(self, n: int, timeout: float = 60.0) -> list[str]:
        return sorted(self._wait(lambda nodes: len(nodes) == n, f"{n} nodes not alive", timeout).values())

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL every process of node `index` (1..): what a preempted VM looks like to Ray."""
        pids = self.nodes[index - 1].kill()
        logger.info("killed node %s (%d processes)", self.nodes[index - 1].host, len(pids))
        return pids

    def start_node(self, index: int, timeout: float = 60.0) -> RayNode:
        """(Re)start node `index` on its address, a replacement for a lost node; returns once the GCS
        reports a node there that was not alive before."""
        node = self.nodes[index - 1]
        before = set(self.alive_nodes())
        node.start()
        self._wait(lambda nodes: any(i not in before and ip == node.host for i, ip in nodes.items()),
                   f"no new node alive at {node.host}", timeout)
        return node

    def stop(self) -> None:
        """Every node, then the head; each is stopped even if stopping another failed."""
        errors = []
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others, then report
                errors.append(e)
        self.head.stop()
        if errors:
            raise errors[0]

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
