"""Stages resume where they stopped: a killed encode loses only its in-flight shards, a killed generate
only its in-flight batches, and the reruns' files are byte-identical to an uninterrupted run's.

Each kill test runs the stage's job as a subprocess driver (its own process group) against the session's
Ray head, SIGKILLs it once some units are done, first shows that state (done records, no _COMMITTED,
no actor of the killed job left), then reruns the stage in this process and compares every file's
sha256 with a clean run's. The clean runs come from one module-scoped chain (ingest -> encode ->
a 4-step checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from pipeline import config, paths, storage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
# Many small shards (2 rows each: 16 train + 8 test + one bad shard) so that a kill lands mid-way.
DATA = ["vae.source=random", "data.n_train=32", "data.n_test=16", "data.shard_size=2"]
TRAIN = ["train.num_workers=1", "train.steps=4", "train.checkpoint_every=4", "train.report_every=2",
         "train.batch_size=8"]
# 12 batches of 2 images; no report. FID off: its sqrtm of a 2048 x 2048 matrix alone took 20-40 s per run
# on 2 cores; the test compares the Inception moments FID is computed from instead (FID is a function of
# them and of the fixed reference statistics).
GENERATE = ["generate.num_images=24", "generate.batch_size=2", "generate.steps=10", "eval.report=false",
            "fid.enabled=false"]


def _bad_shard() -> bytes:
    from pipeline.data.shards import build_tar

    return build_tar([("bad_png", b"\x89PNG\r\n\x1a\n not a png", "a broken image", "png", {}),
                      ("empty_caption", _png(), "   ", "png", {})])


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def chain(s3, ray_cluster):
    """Raw shards in their own prefix (shared by every run through data.input_uri, so rejects' `source`
    columns agree), a clean encode and a 4-step checkpoint in prefix `clean`."""
    from pipeline.data.encode import encode
    from pipeline.data.ingest import ingest

    root = f"{s3.uri}/resume-{uuid.uuid4().hex[:8]}"
    data = DATA + [f"data.input_uri={root}/raw"]
    cfg = config.load(TINY, [f"run.storage={root}/clean", *data, *TRAIN])
    counts = ingest(cfg)
    storage.write_bytes(storage.join(paths.raw(cfg), "train", "00099.tar"), _bad_shard())
    manifest = encode(cfg)
    _train_checkpoint(cfg, manifest)
    return {"root": root, "data": data, "cfg": cfg, "counts": counts, "manifest": manifest}


def _train_checkpoint(cfg, manifest: dict) -> None:
    """A checkpoint of the run, trained on its latents without Ray Train (whose start alone takes ~20 s;
    fit is tested elsewhere) and stored as rank 0 stores one: generate only needs a trusted checkpoint."""
    import tempfile

    import torch

    from pipeline.data.latents import load_null_text, read_latents
    from pipeline import checkpoint_store
    from pipeline.train.loop import latest_local_checkpoint, train_locally
    from pipeline.train.trainer import latest_checkpoint_uri, run_uri

    table = read_latents(paths.latents(cfg), "train", ["key", "latent", "text_emb", "text_mask"])

    def column(name, dtype, shape=None):
        return torch.tensor(np.stack([np.asarray(v, dtype).reshape(shape or -1) for v in table.column(name).to_pylist()]))

    data = {"key": table.column("key").to_pylist(), "latent": column("latent", np.float32, manifest["latent_shape"]),
            "text_emb": column("text_emb", np.float32, manifest["text_shape"]), "text_mask": column("text_mask", np.int64)}
    null_emb, null_mask = (torch.tensor(a) for a in load_null_text(paths.latents(cfg)))
    with tempfile.TemporaryDirectory() as tmp:
        train_locally(cfg, manifest, null_emb, null_mask, data, tmp)
        checkpoint_store.save_to_storage(latest_local_checkpoint(tmp), run_uri(cfg), cfg.train.steps, cfg.train.num_to_keep)
    assert latest_checkpoint_uri(cfg) is not None


# ------------------------------------------------------------------------------------------- helpers


class Job:
    """`python -m jobs.<stage>` as a driver of the session's cluster, in a process group of its own,
    its output in a file."""

    def __init__(self, stage: str, ray_address: str, overrides: list[str], log_path: str):
        self.log_path = log_path
        env = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}  # S3 and the head's auth token, as the fixtures set
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"jobs.{stage}", "--config", TINY, "--ray-address", ray_address, *overrides],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    @property
    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _wait_for(predicate, timeout: float, what: str, job: Job | None = None, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if job is not None and job.proc.poll() is not None:
            pytest.fail(f"the driver exited ({job.proc.returncode}) before {what}:\n{job.output[-4000:]}")
        time.sleep(step)
    pytest.fail(f"no {what} after {timeout:.0f}s" + (f":\n{job.output[-4000:]}" if job else ""))


def _alive_actors(ray_cluster, name: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(address=ray_cluster.dashboard_url, filters=[("state", "=", "ALIVE")], limit=10000)
            if name in a.class_name]


def _hashes(prefix: str, folders: list[str]) -> dict[str, str]:
    """{path relative to prefix: sha256} of every file under the given folders."""
    fs, base = storage.fs_and_path(prefix)
    fs.invalidate_cache()
    out = {}
    for folder in folders:
        for path in fs.find(f"{base}/{folder}"):
            out[path[len(base) + 1:]] = hashlib.sha256(fs.cat_file(path)).hexdigest()
    return out


def _mtimes(prefix: str, names: list[str]) -> dict[str, object]:
    fs, base = storage.fs_and_path(prefix)
    fs.invalidate_cache()
    return {n: fs.info(f"{base}/{n}")["LastModified"] for n in names}


def _names(uri: str) -> list[str]:
    try:
        return [u.rsplit("/", 1)[-1] for u in storage.ls(uri)]
    except FileNotFoundError:  # listed as there, gone when read: polled while being created or removed
        return []


# --------------------------------------------------------------------------------------------- tests


def test_killed_encode_loses_only_in_flight_shards(chain, ray_cluster, tmp_path):
    clean_cfg = chain["cfg"]
    overrides = [f"run.storage={chain['root']}/killed", *chain["data"]]
    cfg = config.load(TINY, overrides)
    out, clean = paths.latents(cfg), paths.latents(clean_cfg)
    assert out != clean and out.rsplit("/", 1)[-1] == clean.rsplit("/", 1)[-1]  # same config, another prefix
    n_shards = chain["manifest"]["n_shards"]
    assert n_shards == 25 and chain["manifest"]["reused_shards"] == 0
    records = storage.join(out, "_shards", "train")
    assert not _alive_actors(ray_cluster, "EncodeShard")  # the clean run's pool is gone

    first = Job("encode", ray_cluster.address, overrides, str(tmp_path / "encode-1.log"))
    try:
        _wait_for(lambda: len(_names(records)) >= 2, 300, "2 done shard records", first)
        assert _alive_actors(ray_cluster, "EncodeShard")  # (so that the check below can see one)
    finally:
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    # The killed job's actors go with their driver: none is left to finish (or rewrite) a shard.
    _wait_for(lambda: not _alive_actors(ray_cluster, "EncodeShard"), 60, "end of the killed job's actors")
    # The fault really happened mid-way: some shards done, not all, nothing committed.
    done = sorted(_names(records)) + sorted("test/" + n for n in _names(storage.join(out, "_shards", "test")))
    assert 2 <= len(done) < n_shards, done
    assert not storage.exists(storage.join(out, storage.COMMIT_MARKER))
    assert not storage.exists(storage.join(out, "manifest.json"))
    done_latents = [f"train/{n.removesuffix('.json')}.parquet" for n in done if not n.startswith("test/")]
    before = _mtimes(out, done_latents)
    time.sleep(1.1)  # LastModified has a resolution of 1 s: a rewrite from now on shows as a later one

    from pipeline.data.encode import encode

    from pipeline.data.latents import read_latents

    manifest = encode(cfg)  # the rerun, in this process (no second interpreter to start)
    # (a) The done shards were kept, not encoded again: counted, and their files untouched.
    assert manifest["reused_shards"] == len(done), (manifest["reused_shards"], done)
    assert _mtimes(out, done_latents) == before
    # (b) Every latent, rejects and done-record file is byte-identical to the uninterrupted run's.
    folders = ["train", "test", "rejects", "_shards"]
    got, want = _hashes(out, folders), _hashes(clean, folders)
    # A done record and a latents file per shard, but the bad shard has only rejects (its 2 rows).
    assert len(want) == 2 * n_shards and "rejects/train/00099.parquet" in want and "train/00099.parquet" not in want
    assert got == want
    # (c) The counts reconcile, per split, and equal the clean run's.
    for split, c in manifest["splits"].items():
        assert c["n_in"] == c["n_encoded"] + c["n_rejected"] == chain["counts"][split] + (2 if split == "train" else 0)
        assert {k: v for k, v in c.items() if k != "reused_shards"} == \
               {k: v for k, v in chain["manifest"]["splits"][split].items() if k != "reused_shards"}
    assert manifest["splits"]["train"]["rejects_by_reason"] == {"undecodable_image": 1, "empty_caption": 1}
    assert read_latents(out, "train", ["key"]).num_rows == manifest["splits"]["train"]["n_encoded"]


def test_killed_generate_resumes_by_image_index(chain, ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.eval import scoring
    from pipeline.eval.run import run as generate_job_run

    overrides = [f"run.storage={chain['root']}/clean", *chain["data"], *TRAIN, *GENERATE]
    cfg = config.load(TINY, overrides)
    out = storage.join(paths.outputs(cfg), "generate")
    clean = generate_job_run(cfg, report=False)
    assert clean["batches"] == 12 and clean["reused_batches"] == 0
    want = _hashes(out, ["images"])
    chunks = scoring.image_chunks("generate", out, clean["prompts"], 8, 2)  # 3 chunks of 8 images
    clean_moments = scoring.score_chunks(cfg, chunks)["generate"]["partial"].moments
    assert len(want) == 24
    storage.rm(out)  # the clean run's images are kept as hashes; the killed run starts from nothing

    first = Job("generate", ray_cluster.address, overrides, str(tmp_path / "generate-1.log"))
    try:
        _wait_for(lambda: len(_names(storage.join(out, "_batches"))) >= 2, 300, "2 done batch records", first)
        assert _alive_actors(ray_cluster, "BatchGenerator")
    finally:
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    _wait_for(lambda: not _alive_actors(ray_cluster, "BatchGenerator"), 60, "end of the killed job's actors")
    done = sorted(_names(storage.join(out, "_batches")))
    assert 2 <= len(done) < 12, done  # killed mid-way
    assert not storage.exists(storage.join(out, storage.COMMIT_MARKER))
    assert storage.exists(storage.join(out, "identity.json"))
    kept_pngs = [f"images/{2 * int(n[:6]) + j:06d}.png" for n in done for j in range(2)]
    before = _mtimes(out, kept_pngs)
    time.sleep(1.1)  # as above: a rewrite would show

    rerun = generate_job_run(cfg, report=False)
    assert (rerun["reused_batches"], rerun["generated_batches"]) == (len(done), 12 - len(done))
    assert _mtimes(out, kept_pngs) == before  # the kept batches were read back, not made again
    assert _hashes(out, ["images"]) == want  # every PNG byte-identical to the uninterrupted run's
    # What FID is computed from: the same Inception moments, bit for bit, kept batches included.
    moments = scoring.score_chunks(cfg, chunks)["generate"]["partial"].moments
    assert moments.count == clean_moments.count == 24 and rerun["prompts"] == clean["prompts"]
    assert np.array_equal(moments.total, clean_moments.total) and np.array_equal(moments.outer, clean_moments.outer)
    meta = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, "metadata.parquet"))))
    assert [int(k) for k in meta.column("key").to_pylist()] == list(range(24))
    assert rerun["latent_std"] == clean["latent_std"]  # kept batches' stats come from their records
    assert storage.read_bytes(storage.join(out, "grid.png")) == clean["grid_png"]
    assert storage.read_json(storage.join(out, storage.COMMIT_MARKER))["n"] == 24


# ---------------------------------------------------------------------- cheap checks, no Ray cluster


def test_a_corrupted_done_shard_is_encoded_again(tmp_path, capsys):
    """A done record is trusted only while it is true: a latent file bit-flipped, deleted, or a record of
    another encoder each make the shard be encoded again (said loudly), to the same bytes."""
    from pipeline.data.readers import list_split_shards
    from pipeline.data.encode_shard import EncodeShard, output_names
    from pipeline.data.ingest import ingest

    cfg = config.load(TINY, [f"run.storage={tmp_path}", "vae.source=random", "data.n_train=4", "data.n_test=2",
                             "data.shard_size=2"])
    ingest(cfg)
    shard = list_split_shards(cfg, "train")[0]
    enc = EncodeShard(cfg.to_dict(), paths.latents(cfg), _driver_encoder_id(cfg))
    names = {k: os.path.join(paths.latents(cfg), v) for k, v in output_names("train", shard).items()}
    row = {"split": ["train"], "shard": [shard]}

    first = enc(row)
    assert first["reused"] == [False]
    original = open(names["latents"], "rb").read()
    mtime = os.stat(names["latents"]).st_mtime_ns
    assert enc(row)["reused"] == [True] and os.stat(names["latents"]).st_mtime_ns == mtime  # kept, not rewritten

    def flip():
        with open(names["latents"], "r+b") as f:
            f.seek(len(original) // 2)
            f.write(bytes([original[len(original) // 2] ^ 0xFF]))

    def foreign():
        rec = json.load(open(names["record"]))
        rec["encoder_id"] = "0" * 16
        storage.write_json(names["record"], rec)

    for fault, message in ((flip, "does not match its recorded sha256"), (lambda: os.remove(names["latents"]),
                           "is missing or has another size"), (foreign, "encoder identity 0000000000000000 differs")):
        fault()
        capsys.readouterr()
        again = enc(row)
        assert again["reused"] == [False], message
        said = capsys.readouterr().out
        assert "encode: NOT reusing train/00000" in said and message in said, said
        assert open(names["latents"], "rb").read() == original  # the same bytes again
        assert again["record"] == first["record"]


def _driver_encoder_id(cfg) -> str:
    """The identity encode's driver passes its actors, from models built as it builds them."""
    from pipeline.data.encode_shard import encoder_id
    from pipeline.models.text import build_text_encoder
    from pipeline.models.vae import build_vae_for

    return encoder_id(build_text_encoder(cfg.text_encoder, cfg.run.seed).identity, build_vae_for(cfg)[1], cfg)


def test_generate_keeps_only_batches_that_verify(tmp_path, capsys):
    """batches.py on hand-written batches: kept while record and PNGs agree; a changed PNG, or another
    identity, is not kept (the latter removes the old images)."""
    from pipeline.eval import batches
    from pipeline.eval.report.render import png_bytes

    out = str(tmp_path / "gen")
    identity = {"format": 1, "sampler": "ddim", "steps": 4}
    assert batches.prepare(out, identity) is False  # nothing there yet
    sha = batches.identity_sha(identity)
    bounds = batches.batch_bounds(5, 2)
    assert bounds == [(0, 2), (2, 4), (4, 5)]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    for k, (a, b) in enumerate(bounds[:2]):  # batch 2 never finished
        pngs = [png_bytes(images[i]) for i in range(a, b)]
        for i, p in zip(range(a, b), pngs):
            storage.write_bytes(os.path.join(out, "images", batches.image_name(i)), p)
        batches.write_record(out, k, a, b, sha, pngs, [1.0] * (b - a))
    assert batches.prepare(out, identity) is True

    def kept() -> list[int]:
        return [k for k, (a, b) in enumerate(bounds) if batches.verified_latent_std(out, k, a, b, sha, 8) is not None]

    assert kept() == [0, 1] and batches.verified_latent_std(out, 1, 2, 4, sha, 8) == [1.0, 1.0]
    assert batches.verified_latent_std(out, 1, 2, 4, sha, 16) is None  # the images are 8x8, not 16x16
    storage.write_bytes(os.path.join(out, "images", "000003.png"), png_bytes(images[0]))  # replaced: the fault
    capsys.readouterr()
    assert kept() == [0]
    assert "NOT keeping batch 1: 000003.png does not match" in capsys.readouterr().out
    assert batches.prepare(out, identity | {"steps": 5}) is False  # other settings: old images removed
    assert "holds images of other settings (steps)" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "images")) and kept() == []
