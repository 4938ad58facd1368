"""Storage faults: 503 SlowDown, connection resets and stalls between the pipeline and a real SeaweedFS.

A fault-injecting proxy (tests/faults/s3_proxy.py) sits in front of the session's SeaweedFS: clients
get its endpoint as AWS_ENDPOINT_URL. Each test asserts from the proxy's counters that its faults were
really injected, then that retries hid them (the bytes are identical) or that a stall ended with
StorageTimeout naming the endpoint, within a bound.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from pipeline import config, paths, storage
from tests.faults.s3_proxy import FaultProxy, Rule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

# Faults on a schedule: about one request in three fails, in three ways; a retry is a new request, so
# one rule never fails the same request twice in a row. 503s are the fewest: each costs botocore's
# backoff (a random 0-1 s, doubling), where a reset is mostly resent at once.
FLAKY = [Rule("slowdown", every=8), Rule("reset", every=5), Rule("reset_mid", every=11)]


@pytest.fixture
def proxy(s3):
    with FaultProxy(s3.endpoint) as p:
        yield p


def _use(monkeypatch: pytest.MonkeyPatch, endpoint: str, timeout_s: float, max_attempts: int) -> None:
    """Point this process at `endpoint` with these io settings; the fixture's values come back after
    the test (monkeypatch records each variable before configure() overwrites it)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for key in (storage.TIMEOUT_ENV, storage.ATTEMPTS_ENV):
        monkeypatch.setenv(key, "")
    storage.configure(timeout_s=timeout_s, max_attempts=max_attempts)


def _faults_seen(proxy: FaultProxy, *actions: str) -> None:
    missing = [a for a in actions if proxy.injected[a] == 0]
    assert not missing, f"the proxy never injected {missing}: {dict(proxy.injected)} in {proxy.requests} requests"


# ------------------------------------------------------------------------------ storage.py helpers


def test_helpers_round_trip_through_503s_and_resets(s3, proxy, monkeypatch, tmp_path) -> None:
    """Writes, an upload, listings, reads and a download through 503s and resets (before the request
    and halfway through the answer) give back the bytes written. (The upload is one PUT: s3fs goes
    multipart only beyond twice its 50 MB block, too big for this proxy's whole-message buffering.)"""
    import pyarrow.fs as pafs

    prefix = f"{s3.uri}/faults-{uuid.uuid4().hex[:8]}"
    _use(monkeypatch, proxy.endpoint, timeout_s=10, max_attempts=4)
    proxy.set_rules(FLAKY)
    rng = np.random.default_rng(0)
    blobs = {f"obj{i}.bin": rng.bytes(150_000 + i) for i in range(6)}
    for name, data in blobs.items():
        storage.write_bytes(f"{prefix}/put/{name}", data)
    local = tmp_path / "big.bin"
    local.write_bytes(rng.bytes(3_000_000))
    storage.upload_file(str(local), f"{prefix}/put/big.bin")
    storage.write_json(f"{prefix}/put/meta.json", {"n": len(blobs)})

    assert storage.ls(f"{prefix}/put") == sorted(f"{prefix}/put/{n}" for n in [*blobs, "big.bin", "meta.json"])
    for name, data in blobs.items():
        assert storage.read_bytes(f"{prefix}/put/{name}") == data
        assert storage.size(f"{prefix}/put/{name}") == len(data)
    assert storage.read_json(f"{prefix}/put/meta.json") == {"n": len(blobs)}
    got = storage.download_dir(f"{prefix}/put", str(tmp_path / "down"))
    assert (tmp_path / "down" / "big.bin").read_bytes() == local.read_bytes(), got
    # pyarrow (Ray Data's and Ray Train's client) through the same faults.
    fs, path = storage.pyarrow_fs(f"{prefix}/arrow.bin")
    with fs.open_output_stream(path) as f:
        f.write(blobs["obj0.bin"])
    with fs.open_input_stream(path) as f:
        assert f.read() == blobs["obj0.bin"]
    assert len(fs.get_file_info(pafs.FileSelector(f"{path.rsplit('/', 1)[0]}/put"))) == len(blobs) + 2
    storage.rm(f"{prefix}/put")
    assert not storage.exists(f"{prefix}/put/obj0.bin")

    _faults_seen(proxy, "slowdown", "reset", "reset_mid")
    by_method = {m for m, _, action in proxy.log if action}
    assert {"GET", "PUT"} <= by_method, proxy.log  # reads and writes both met faults
    print(f"{proxy.requests} requests, injected {dict(proxy.injected)}")


def test_a_fault_on_every_attempt_fails_with_the_endpoint_named(s3, proxy, monkeypatch) -> None:
    """When every attempt gets a 503, the error says which endpoint, what and where, after
    max_attempts tries per request (not one, not forever)."""
    uri = f"{s3.uri}/faults-{uuid.uuid4().hex[:8]}/x.bin"
    storage.write_bytes(uri, b"x")  # direct, before the proxy
    _use(monkeypatch, proxy.endpoint, timeout_s=10, max_attempts=3)
    proxy.set_rules([Rule("slowdown", path=uri.split("/", 3)[3])])
    with pytest.raises(storage.StorageUnavailable) as e:
        storage.read_bytes(uri)
    assert not isinstance(e.value, storage.StorageTimeout)
    msg = str(e.value)
    assert f"storage endpoint {proxy.endpoint} failed to read {uri}: 3 attempts per request" in msg, msg
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in msg and s3.env["AWS_ACCESS_KEY_ID"] not in msg
    # botocore's 3 attempts per request inside s3fs's loops (nested twice for a read): tried again, and bounded.
    assert 3 <= proxy.injected["slowdown"] <= 3 * storage._S3FS_PASSES ** 2, proxy.log


def test_ray_jobs_get_the_storage_settings_and_no_credentials(s3, monkeypatch) -> None:
    """What cli gives ray.init as the job's runtime_env: the endpoint, region and io limits, never a key;
    and under `ray job submit` none of the variables the submitted job sets itself, which Ray's merge
    would refuse (it raises on a variable set twice)."""
    import json

    from ray.runtime_env.runtime_env import _merge_runtime_env

    from pipeline import cli

    _use(monkeypatch, s3.endpoint, timeout_s=7, max_attempts=3)
    for other in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(other, raising=False)
    env = cli.runtime_env()["env_vars"]
    assert env == {storage.TIMEOUT_ENV: "7.0", storage.ATTEMPTS_ENV: "3", "AWS_ENDPOINT_URL": s3.endpoint,
                   "AWS_REGION": s3.env["AWS_REGION"]}
    assert not any(secret in json.dumps(env) for secret in (s3.env["AWS_SECRET_ACCESS_KEY"], s3.env["AWS_ACCESS_KEY_ID"]))

    job = {"working_dir": "gcs://x.zip", "env_vars": {"AWS_REGION": s3.env["AWS_REGION"], storage.TIMEOUT_ENV: "9"}}
    assert _merge_runtime_env(job, {"env_vars": env}) is None  # the conflict the job would hit
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job}))
    ours = cli.runtime_env()
    assert set(ours["env_vars"]) == {storage.ATTEMPTS_ENV, "AWS_ENDPOINT_URL"}
    assert _merge_runtime_env(job, ours)["env_vars"] == {**job["env_vars"], **ours["env_vars"]}


# ------------------------------------------------------------------------------------------ stalls


def _bounded(fn, limit_s: float):
    """Run `fn` in a thread; (exception or result, seconds). Fails the test if it is still running
    after `limit_s`: a hang, which is what this file exists to rule out."""
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["value"] = e
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"still waiting after {limit_s} s: a stall became a hang"
    return out["value"], out["seconds"]


def _read_with_pyarrow(uri: str) -> bytes:
    fs, path = storage.pyarrow_fs(uri)
    with storage.translate_errors("read", uri), fs.open_input_stream(path) as f:
        return f.read()


@pytest.mark.parametrize("client, where", [("s3fs", "stall"), ("s3fs", "stall_mid"), ("pyarrow", "stall")])
def test_a_stall_ends_with_storage_timeout_naming_the_endpoint(s3, proxy, monkeypatch, client, where) -> None:
    """The endpoint accepts the connection and then says nothing (before the headers, or halfway
    through the body) for longer than io.timeout_s: the read ends with StorageTimeout naming the
    proxy's endpoint, the operation and the URI, after retrying, instead of waiting forever.
    (pyarrow halfway through a body: the same curl timeout, but curl averages the speed over ~5 s,
    so each attempt takes ~7 s; left out for time.)"""
    uri = f"{s3.uri}/faults-{uuid.uuid4().hex[:8]}/stalled.bin"
    storage.write_bytes(uri, os.urandom(200_000))  # direct, before the proxy
    _use(monkeypatch, proxy.endpoint, timeout_s=0.5, max_attempts=2)
    proxy.set_rules([Rule(where, path=uri.split("/", 3)[3], method="GET")])  # the object's GETs only
    read = storage.read_bytes if client == "s3fs" else _read_with_pyarrow
    err, seconds = _bounded(lambda: read(uri), limit_s=90)
    assert isinstance(err, storage.StorageTimeout), repr(err)
    msg = str(err)
    assert f"storage endpoint {proxy.endpoint} did not answer within 0.5 s (read {uri})" in msg, msg
    assert err.endpoint == proxy.endpoint and err.uri == uri
    # The stalled GET was retried before giving up, and no more often than the documented bound
    # (storage's docstring: s3fs's loops nest twice around botocore's 2 attempts for a read).
    bound = 2 * (storage._S3FS_PASSES ** 2 if client == "s3fs" else 1)
    assert 2 <= proxy.injected[where] <= bound, proxy.log
    print(f"{client} {where}: StorageTimeout after {seconds:.1f} s, {proxy.injected[where]} stalled GETs")


# ------------------------------------------------------------------------------------- checkpoints


def _sha256_tree(folder) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def test_checkpoint_upload_and_load_through_faults(s3, proxy, monkeypatch, tmp_path) -> None:
    """Rank 0's path: save_checkpoint locally, upload (files, manifest last) and prune, then the newest
    trusted one is found, downloaded and verified, all through 503s and resets; the downloaded
    files are the saved ones, byte for byte."""
    import torch

    from pipeline import checkpoint, checkpoint_store

    run_uri = f"{s3.uri}/faults-{uuid.uuid4().hex[:8]}/checkpoints/run"
    _use(monkeypatch, proxy.endpoint, timeout_s=10, max_attempts=4)
    proxy.set_rules(FLAKY)
    torch.manual_seed(0)
    saved = {}
    for step in (5, 10):  # two saves with num_to_keep=1: pruning runs through the faults too
        local = tmp_path / f"local-{step}"
        state = {"model": {"w": torch.randn(256, 256), "b": torch.randn(256)}, "step": step}
        checkpoint.save_checkpoint(str(local), state, {"step": step})
        saved[step] = (local, state)
        checkpoint_store.save_to_storage(str(local), run_uri, step, num_to_keep=1)
    assert [step for step, _ in checkpoint_store.candidates(run_uri)] == [10]

    folder, state, manifest = checkpoint_store.load_newest_trusted(run_uri)
    assert manifest["step"] == 10 and torch.equal(state["model"]["w"], saved[10][1]["model"]["w"])
    down = tmp_path / "down"
    checkpoint_store.fetch(folder, str(down))
    assert _sha256_tree(down) == _sha256_tree(saved[10][0])
    _faults_seen(proxy, "slowdown", "reset", "reset_mid")
    print(f"{proxy.requests} requests, injected {dict(proxy.injected)}")


# ---------------------------------------------------------------------------- encode and generate

CHAIN = ["vae.source=random", "data.n_train=32", "data.n_test=8", "data.shard_size=16", "train.steps=1",
         "generate.num_images=4", "generate.batch_size=2", "generate.steps=2", "fid.enabled=false",
         "eval.report=false"]
# Aimed at the Ray workers' own writes (encode's actors write the latents, generate's the PNGs): they
# show that the job's runtime_env took the workers' requests to the proxy (the Ray head's environment
# points straight at SeaweedFS) and that the workers retried.
WORKER_FAULTS = [Rule("reset_mid", method="PUT", path=r"/images/.*\.png$", every=3),
                 Rule("slowdown", method="PUT", path=r"/(train|test)/[^/]*\.parquet$", every=3)]
# Records that hold how long their stage took, and the commit marker that holds their sha256.
TIMED_RECORDS, TIMINGS = ("manifest.json", "generate.json"), ("seconds", "images_per_s")
# One driver process for both stages, as `python -m jobs.<stage>` would run them.
DRIVER = "import sys; from jobs import encode, generate; encode.main(sys.argv[1:]); generate.main(sys.argv[1:])"


def _outputs(uri: str) -> dict:
    """sha256 of every object under `uri` by its path there (whatever the layout), except the timed
    records (compared without their timings) and the commit marker (without their hashes)."""
    fs, path = storage.fs_and_path(uri)
    fs.invalidate_cache()
    out: dict = {f[len(path) + 1:]: hashlib.sha256(fs.cat_file(f)).hexdigest() for f in sorted(fs.find(path))}
    for name in set(TIMED_RECORDS) & set(out):
        out[name] = {k: v for k, v in storage.read_json(storage.join(uri, name)).items() if k not in TIMINGS}
    if storage.COMMIT_MARKER in out:
        marker = storage.read_json(storage.join(uri, storage.COMMIT_MARKER))
        out[storage.COMMIT_MARKER] = marker | {"sha256": {k: v for k, v in marker.get("sha256", {}).items()
                                                          if k not in TIMED_RECORDS}}
    return out


def _store_a_checkpoint(cfg, manifest: dict) -> None:
    """A trusted checkpoint of the run, as rank 0 stores one, trained one step without Ray Train (whose
    start alone takes ~20 s; fit is tested elsewhere) on random tensors: generate needs only weights."""
    import tempfile

    import torch

    from pipeline import checkpoint_store
    from pipeline.train.loop import latest_local_checkpoint, train_locally
    from pipeline.train.trainer import run_uri

    g = torch.Generator().manual_seed(0)
    n, (length, dim) = cfg.train.batch_size, manifest["text_shape"]
    data = {"latent": torch.randn(n, *manifest["latent_shape"], generator=g),
            "text_emb": torch.randn(n, length, dim, generator=g), "text_mask": torch.ones(n, length, dtype=torch.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        train_locally(cfg, manifest, torch.zeros(length, dim), torch.ones(length, dtype=torch.int64), data, tmp)
        checkpoint_store.save_to_storage(latest_local_checkpoint(tmp), run_uri(cfg), cfg.train.steps, 1)


@pytest.fixture(scope="module")
def clean_run(s3, ray_cluster):
    """ingest -> encode -> (a checkpoint) -> generate straight to SeaweedFS, in this process; returns
    the config and the outputs of encode and generate, the reference for the faulty run."""
    from pipeline.eval.run import run as generate_run
    from pipeline.data.encode import encode
    from pipeline.data.ingest import ingest

    cfg = config.load(TINY, [f"run.storage={s3.uri}/faults-{uuid.uuid4().hex[:8]}", *CHAIN])
    ingest(cfg)
    _store_a_checkpoint(cfg, encode(cfg))
    generate_run(cfg, report=False)
    return cfg, {"latents": _outputs(paths.latents(cfg)), "generate": _outputs(storage.join(paths.outputs(cfg), "generate"))}


def test_encode_and_generate_through_faults_match_a_clean_run(s3, ray_cluster, clean_run, proxy, tmp_path) -> None:
    """encode and generate again, from the same inputs to the same places, by a driver process of
    their own on the session's cluster, with every request of the driver and of its Ray workers going
    through 503s and resets: the latents, the PNGs and everything else they write are the clean
    run's, byte for byte."""
    cfg, reference = clean_run
    uris = {"latents": paths.latents(cfg), "generate": storage.join(paths.outputs(cfg), "generate")}
    for uri in uris.values():
        storage.rm(uri)  # (straight to SeaweedFS): nothing of the clean run is left to be reused
    proxy.set_rules(WORKER_FAULTS + FLAKY)
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-c", DRIVER, "--config", TINY, "--ray-address", ray_cluster.address,
           f"run.storage={cfg.run.storage}", *CHAIN, "io.timeout_s=20", "io.max_attempts=6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    _faults_seen(proxy, "slowdown", "reset", "reset_mid")
    # Faults on writes only Ray actors make (an image of a generator actor, a shard's latents of an
    # encoder actor; the driver writes neither): the job's runtime env sent the workers through the proxy.
    at_workers = {t.rsplit(".", 1)[1] for m, t, a in proxy.log
                  if a and m == "PUT" and re.search(r"/images/\d{6}\.png$|/(train|test)/\d+\.parquet$", t)}
    assert at_workers == {"png", "parquet"}, proxy.log
    assert any(name.endswith(".parquet") for name in reference["latents"]), reference
    assert sum(name.endswith(".png") for name in reference["generate"]) >= 4, reference
    for what, uri in uris.items():
        assert _outputs(uri) == reference[what], what
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("encode:", "generate:"))))
    print(f"{proxy.requests} requests, injected {dict(proxy.injected)}; outputs identical: "
          f"{len(reference['latents'])} latent objects, {len(reference['generate'])} generate objects")
