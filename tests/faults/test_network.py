"""Network faults of local mode: what listens where, Ray token auth, and which cluster a stage joins.

Each test shows the fault first where it can (the same check failing without the fix), then that
the fix holds. HOME is a temporary folder wherever Ray might read or write ~/.ray/auth_token.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.dev.processes import free_ports
from pipeline.dev.ray_head import LocalRay, RayAuthError, wait_job_server
from pipeline.dev.s3 import SeaweedS3
from pipeline.train import dist as rld_dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")


def _is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped 127.x on an IPv6 socket (gcs_server and raylet bind those)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _listening(pid: int) -> list[tuple[str, int]]:
    import psutil

    try:
        p = psutil.Process(pid)
        conns = p.net_connections(kind="inet") if hasattr(p, "net_connections") else p.connections(kind="inet")
    except psutil.Error:
        return []
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line (or working directory) names `text`."""
    from pipeline.dev.watchdog import processes_using

    return [p.pid for p in processes_using(text)]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------------------- torch.distributed


def test_plain_tcpstore_listens_on_every_interface_ours_on_loopback() -> None:
    """The fault, in torch itself: a master TCPStore given host 127.0.0.1 still listens on "::"
    (or 0.0.0.0). With a socket bound to 127.0.0.1 handed over as master_listen_fd, it does not."""
    import torch.distributed as td

    timeout = datetime.timedelta(seconds=10)
    plain = td.TCPStore("127.0.0.1", 0, 1, True, timeout)
    try:
        (ip, _), = [a for a in _listening(os.getpid()) if a[1] == plain.port]
        assert not _is_loopback(ip), f"torch's TCPStore now binds {ip}: this fault is gone upstream"
    finally:
        del plain

    port = rld_dist._bind_store_socket("127.0.0.1")
    sock, rld_dist._STORE_SOCKET = rld_dist._STORE_SOCKET, None
    ours = td.TCPStore("127.0.0.1", port, 1, True, timeout, master_listen_fd=sock.detach())
    try:
        assert ours.port == port
        assert [a for a in _listening(os.getpid()) if a[1] == port] == [("127.0.0.1", port)]
        ours.set("k", "v")
        assert td.TCPStore("127.0.0.1", port, 1, False, timeout).get("k") == b"v"
    finally:
        del ours


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1", True), ("127.0.0.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("::ffff:127.0.0.1", True), ("::", False), ("0.0.0.0", False), ("10.0.0.5", False), ("192.0.2.2", False),
    ("fd00::2", False), ("head-node", False),
])
def test_loopback_decision(address: str, expected: bool) -> None:
    """Only a cluster on loopback addresses gets the loopback store: elsewhere other hosts must reach it."""
    assert rld_dist.is_loopback(address) is expected


def _train_and_scan(s3: SeaweedS3, head: LocalRay, torch_config, out_path: str) -> dict:
    """A 2-worker gloo TorchTrainer whose rank 0, while the process group is up, lists every LISTEN
    socket of every process of the run: weed's group, the Ray head's group and all their descendants
    (Train workers included), and this driver."""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import json as _json
        import os as _os

        import psutil
        import ray.train as _train
        import torch.distributed as td

        pids = [None] * td.get_world_size()
        td.all_gather_object(pids, _os.getpid())
        if _train.get_context().get_world_rank() == 0:
            scope = set(config["pids"]) | set(pids)
            for p in psutil.process_iter():
                try:
                    if _os.getpgid(p.pid) in config["pgids"]:
                        scope.add(p.pid)
                except (psutil.Error, ProcessLookupError):
                    pass
            for pid in list(scope):
                try:
                    scope |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
                except psutil.Error:
                    pass
            listens = []
            for pid in sorted(scope):
                try:
                    proc = psutil.Process(pid)
                    conns = proc.net_connections(kind="inet") if hasattr(proc, "net_connections") \
                        else proc.connections(kind="inet")
                    name = proc.name()
                except psutil.Error:
                    continue
                listens += [[pid, name, c.laddr.ip, c.laddr.port] for c in conns if c.status == psutil.CONN_LISTEN]
            with open(config["out"], "w") as f:
                _json.dump({"listens": listens, "worker_pids": pids, "master_port": int(_os.environ["MASTER_PORT"]),
                            "gloo_ifname": _os.environ.get("GLOO_SOCKET_IFNAME"), "backend": td.get_backend()}, f)
        td.barrier()  # rank 1 (and its gloo sockets) stay up until rank 0 has looked

    trainer = TorchTrainer(
        train_loop_per_worker=loop,
        train_loop_config={"pids": [os.getpid()], "pgids": [s3.pid, head._pgid], "out": out_path},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name=f"net-{uuid.uuid4().hex[:8]}",
                                       storage_path=f"{s3.uri}/faults-network"),
        torch_config=torch_config,
    )
    trainer.fit()
    with open(out_path) as f:
        return json.load(f)


@pytest.mark.parametrize("which", ["ray_default", "loopback"])
def test_train_run_listens_on_loopback_only(which: str, s3: SeaweedS3, ray_cluster: LocalRay, tmp_path) -> None:
    """Every LISTEN socket of the run is on loopback with our torch config; with Ray's default
    TorchConfig the same scan finds rank 0's store on every interface (the fault is real)."""
    from ray.train.torch import TorchConfig

    config = TorchConfig(backend="gloo") if which == "ray_default" else rld_dist.torch_config(backend="gloo")
    scan = _train_and_scan(s3, ray_cluster, config, str(tmp_path / "scan.json"))
    listens = [tuple(entry) for entry in scan["listens"]]
    assert scan["backend"] == "gloo" and len(scan["worker_pids"]) == 2
    pids = {pid for pid, *_ in listens}
    assert set(scan["worker_pids"]) <= pids and s3.pid in pids  # the scan covered the workers and weed
    store = [(ip, port) for _, _, ip, port in listens if port == scan["master_port"]]
    assert store, "the store's port was not among the listening sockets"
    exposed = sorted({(name, ip, port) for _, name, ip, port in listens if not _is_loopback(ip)})
    if which == "ray_default":
        assert any(not _is_loopback(ip) for ip, _ in store), store
    else:
        assert exposed == [], f"listening beyond loopback: {exposed}"
        assert store == [("127.0.0.1", scan["master_port"])]
        assert scan["gloo_ifname"] == rld_dist.loopback_interface()


# ------------------------------------------------------------------------------------ Ray token auth


class _StatusServer:
    """A tiny HTTP server on 127.0.0.1 answering every GET with `status` (and recording headers)."""

    def __init__(self, status: int) -> None:
        seen = self.headers = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                seen.append(dict(self.headers))
                body = f"status {status}".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_StatusServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [401, 403])
def test_job_server_refusing_auth_is_an_auth_error_not_down(status: int, tmp_path) -> None:
    """A 401/403 ends the wait at once with an error about authentication, and LocalRay sends its token."""
    with _StatusServer(status) as srv:
        head = LocalRay(str(tmp_path), start_timeout=30)
        head.ports = {"dashboard-port": int(srv.url.rsplit(":", 1)[1])}
        t0 = time.monotonic()
        with pytest.raises(RayAuthError, match="authentication") as info:
            head._wait_job_server()
        assert time.monotonic() - t0 < 5  # not the 30 s of "not answering"
        assert "not answering" not in str(info.value) and f"HTTP {status}" in str(info.value)
        assert srv.headers[0]["Authorization"] == head.auth_headers["Authorization"]
        assert head.auth_env["RAY_AUTH_TOKEN"] not in str(info.value) + repr(head)


def test_job_server_down_is_still_a_timeout() -> None:
    with _StatusServer(503) as srv:
        with pytest.raises(TimeoutError, match="not answering.*HTTP 503"):
            wait_job_server(srv.url, timeout=1.0)
    port = free_ports(1)[0]
    with pytest.raises(TimeoutError, match="not answering"):
        wait_job_server(f"http://127.0.0.1:{port}", timeout=0.5)


def _home_with_token(tmp_path) -> tuple[str, str]:
    """A HOME holding .ray/auth_token, as an in-process ray.init() leaves it."""
    import secrets

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(token)
    return str(home), token


class _HeadWithoutOwnAuth(LocalRay):
    """LocalRay as it was before: the head's environment carries no auth settings of its own."""

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            env.pop(k, None)
        return env

    @property
    def auth_headers(self) -> dict[str, str]:
        return {}  # and a token-less probe, as before

    def _wait_job_server(self) -> None:
        """(Times the wait for the job server alone, from when `ray start` has returned.)"""
        t0 = time.monotonic()
        try:
            super()._wait_job_server()
        finally:
            self.waited = time.monotonic() - t0


def test_home_auth_token_turns_on_auth_of_a_plain_head(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault: with ~/.ray/auth_token present a plain `ray start` turns token auth on, and the
    job server refuses a token-less client; it is now reported as that at once, not as a timeout."""
    home, _ = _home_with_token(tmp_path)
    monkeypatch.setenv("HOME", home)
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    head = _HeadWithoutOwnAuth(str(tmp_path / "r"), num_cpus=1, start_timeout=90)
    with pytest.raises(RayAuthError, match="authentication"):
        head.start()
    # Refused as soon as the job server answers, not after start_timeout of "not answering" (the
    # dashboard comes up some seconds after `ray start` returns, more on a loaded machine).
    assert head.waited < 60, f"{head.waited:.1f}s"
    assert not head.running and _processes_mentioning(head.temp_dir) == []


def test_local_ray_works_with_a_home_auth_token(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ~/.ray/auth_token present the head comes up with its own token; `ray job submit` with the
    head's auth_env works; the token in ~/.ray (another run's, another cluster's) is refused."""
    home, home_token = _home_with_token(tmp_path)
    monkeypatch.setenv("HOME", home)
    with LocalRay(str(tmp_path / "r"), num_cpus=1) as head:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        ok = subprocess.run([RAY_BIN, "job", "submit", "--address", head.dashboard_url, "--",
                             sys.executable, "-c", "print('job ok')"],
                            capture_output=True, text=True, timeout=120, env={**base, **head.auth_env})
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "job ok" in ok.stdout.splitlines() and "succeeded" in ok.stdout
        # The token Ray saved in ~/.ray (RAY_AUTH_MODE=token alone makes the client send it) is refused,
        # and so is no token at all.
        with pytest.raises(RayAuthError):
            wait_job_server(head.dashboard_url, {"Authorization": f"Bearer {home_token}"}, timeout=5)
        with pytest.raises(RayAuthError):
            wait_job_server(head.dashboard_url, None, timeout=5)
        other = subprocess.run([RAY_BIN, "job", "submit", "--address", head.dashboard_url, "--", "true"],
                               capture_output=True, text=True, timeout=120, env={**base, "RAY_AUTH_MODE": "token"})
        assert other.returncode != 0
    assert (tmp_path / "home" / ".ray" / "auth_token").read_text() == home_token


# ------------------------------------------------------------------------- which cluster a stage joins


def test_stage_alone_uses_its_own_cluster(ray_cluster: LocalRay, tmp_path) -> None:
    """Another cluster is running and is the machine's "current" one (its address in Ray's
    ray_current_cluster file, as a plain `ray start` leaves it). A plain ray.init() joins it (the
    fault); a stage run alone starts, uses and removes a private head instead, and writes no
    ~/.ray/auth_token."""
    import ray
    from ray.util.state import list_jobs

    from pipeline import config
    from pipeline.data.ingest import ingest

    ray_tmp = tmp_path / "raytmp"
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(ray_cluster.address)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(ray_tmp), "HOME": str(home), "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path)}
    # RAY_AUTH_* of the other cluster stay in env (connected fixtures put them there): a plain
    # ray.init() gets in; the stage must not even try.
    assert env.get("RAY_AUTH_TOKEN") == ray_cluster.auth_env["RAY_AUTH_TOKEN"]

    def jobs() -> set[str]:
        return {j.job_id for j in list_jobs(address=ray_cluster.dashboard_url)}

    jobs_before_plain = jobs()
    plain = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(); print('GCS', ray.get_runtime_context().gcs_address)"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert f"GCS {ray_cluster.address}" in plain.stdout, plain.stdout[-2000:] + plain.stderr[-2000:]
    jobs_before = jobs()
    assert len(jobs_before - jobs_before_plain) == 1  # the plain driver shows in the other cluster's jobs

    storage_dir = str(tmp_path / "store")
    overrides = [f"run.storage={storage_dir}", "data.n_train=16", "data.n_test=8", "vae.source=random"]
    ingest(config.load(TINY, overrides))  # no Ray in ingest
    proc = subprocess.run([sys.executable, "-m", "jobs.encode", "--config", TINY, *overrides],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    m = re.search(r"started a private Ray head at (\S+) \(dashboard \S+, folder (\S+)\)", out)
    assert m, out[-3000:]
    address, run_dir = m.group(1), m.group(2)
    assert address != ray_cluster.address and address.startswith("127.0.0.1:")
    assert "encoded" in proc.stdout
    # The other cluster saw no new driver, and is still alone with its one node.
    assert jobs() == jobs_before
    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"]
    # Nothing of the private head is left: no process, no port, no folder; no token saved in HOME.
    assert _processes_mentioning(LocalRay(run_dir).temp_dir) == [] and _processes_mentioning(run_dir) == []
    assert not _port_open(int(address.rsplit(":", 1)[1]))
    assert not os.path.exists(run_dir)
    assert not (home / ".ray" / "auth_token").exists()


def test_jobs_take_a_ray_address_flag() -> None:
    from pipeline import cli

    _, args = cli.parse("x", ["--config", TINY, "--ray-address", "10.1.2.3:6379", "train.steps=3"])
    assert args.ray_address == "10.1.2.3:6379" and args.overrides == ["train.steps=3"]
    _, args = cli.parse("x", ["--config", TINY])
    assert args.ray_address is None


def test_connect_ray_never_inits_without_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from pipeline import cli

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init() without an address"))
    with pytest.raises(RuntimeError, match="no Ray cluster address"):
        cli.connect_ray()
    assert cli.cluster_address("1.2.3.4:6379") == "1.2.3.4:6379"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    assert cli.cluster_address() == "127.0.0.1:9" and cli.cluster_address("x:1") == "x:1"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_private_head_of_a_stage_is_stopped_on_signals(sig: str, tmp_path) -> None:
    """`timeout`/`kill` (SIGTERM) and Ctrl-C (SIGINT) during a stage run alone stop its private head."""
    import signal

    script = (
        "import time\n"
        "from pipeline import cli\n"
        "with cli.ray_session():\n"
        "    import ray\n"
        "    print('CPUS', ray.cluster_resources()['CPU'], flush=True)\n"
        "    time.sleep(120)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"HOME": str(tmp_path), "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path)}
    # One pipe for both streams, read to the end: a second, undrained pipe could fill and block the child.
    # SIGINT back to its default in the child: ignored (pytest started as a script's `... &`), it would
    # stay ignored across exec and the Ctrl-C case would prove nothing.
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        while not any(line.startswith("CPUS") for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)[-3000:]
            lines.append(line)
        m = re.search(r"started a private Ray head at (\S+) \(dashboard \S+, folder (\S+)\)", "".join(lines))
        assert m, lines
        address, run_dir = m.group(1), m.group(2)
        temp_dir = LocalRay(run_dir).temp_dir
        assert _processes_mentioning(temp_dir)
        proc.send_signal(getattr(signal, sig))
        rest, _ = proc.communicate(timeout=90)
        rc = proc.returncode
        out = "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0
    if sig == "SIGTERM":
        assert rc == 143, out[-3000:]
    deadline = time.monotonic() + 10
    while _processes_mentioning(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(temp_dir) == [] and _processes_mentioning(run_dir) == []
    assert not _port_open(int(address.rsplit(":", 1)[1]))
    assert f"its logs are in {run_dir}" in out  # kept after a failed run, and said where
    assert not (tmp_path / ".ray").exists()
