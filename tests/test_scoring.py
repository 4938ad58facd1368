"""Distributed image metrics (pipeline/eval/scoring.py) against the single-process implementation.

Fixed images: a "generated" set written as a generate output's PNGs, and a test split of two raw
shards. FID through the actor pool (partial moments merged on the driver, the reference computed by
the same code over the shards) must equal FID computed in one process from all features at once
(`fid.fid_from_images`, what the generate job used before) within 1e-6 relative.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch

from pipeline import config, paths, storage
from pipeline.data.shards import build_tar
from pipeline.eval import fid, scoring
from pipeline.eval.batches import image_name
from pipeline.eval.report.render import png_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SIZE = 16


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth blobs plus noise (varied Inception features), SIZE x SIZE."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32))
    img = torch.nn.functional.interpolate(low, size=SIZE, mode="bilinear", align_corners=False)
    img = img + torch.from_numpy(rng.normal(0, 20, img.shape).astype(np.float32))
    return img.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def fixed(s3, ray_cluster):
    """A config over a fresh prefix holding a raw test split (2 shards, 20 + 16 images, one bad record)
    and a generate output of 24 PNGs."""
    prefix = f"{s3.uri}/scoring-{uuid.uuid4().hex[:8]}"
    cfg = config.load(TINY, [f"run.storage={prefix}", "vae.source=random", "fid.batch_size=10"])
    real, gen = _images(36, seed=1), _images(24, seed=2)
    shards = [[(f"{i:04d}", png_bytes(real[i]), f"caption {i}", "png", {}) for i in range(0, 20)],
              [(f"{i:04d}", png_bytes(real[i]), f"caption {i}", "png", {}) for i in range(20, 36)]]
    shards[1].insert(3, ("bad", b"not an image", "a broken one", "png", {}))  # left out, as encode rejects it
    for k, samples in enumerate(shards):
        storage.write_bytes(storage.join(paths.raw(cfg), "test", f"{k:05d}.tar"), build_tar(samples))
    out = storage.join(prefix, "gen")
    for i, img in enumerate(gen):
        storage.write_bytes(storage.join(out, "images", image_name(i)), png_bytes(img))
    return {"cfg": cfg, "real": real, "gen": gen, "out": out}


def test_distributed_fid_equals_single_process_fid(fixed):
    cfg, real, gen = fixed["cfg"], fixed["real"], fixed["gen"]
    prompts = [f"p{i}" for i in range(len(gen))]
    chunks = scoring.image_chunks("gen", fixed["out"], prompts, chunk_images=8, batch_size=4)
    assert [(c["start"], c["stop"]) for c in chunks] == [(0, 8), (8, 16), (16, 24)]
    ref, _, identity = scoring.reference_stats(cfg)
    moments = scoring.score_chunks(cfg, chunks)["gen"]["partial"].moments
    new = fid.fid_of_moments(moments, ref)

    ref_old = fid.FeatureStats.from_features(fid.inception_features(real, 10))
    old, gen_old = fid.fid_from_images(gen, ref_old, batch_size=10)
    assert ref.count == 36 and moments.count == 24 and identity["shards"].keys() == {"00000.tar", "00001.tar"}
    assert new == pytest.approx(old, rel=1e-6) and old > 1.0
    # The features themselves agree to float32 rounding (CPU convolutions round differently with batch
    # composition and thread count: an actor runs one thread on 8-image chunks, this process two on 10).
    np.testing.assert_allclose(moments.stats().sigma, gen_old.sigma, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ref.mu, ref_old.mu, rtol=1e-5)
    print(f"FID distributed {new!r}, single process {old!r}, relative difference {abs(new - old) / old:.2e}")


def test_reference_limit_and_cache_hit_reads_no_shard(fixed, monkeypatch):
    """fid.n_ref=25: the first 25 usable images in shard order (the bad record skipped, the second shard
    cut after 5). Its cache hit then lists the shards and reads only the cache object: no decoding."""
    cfg = config.load(TINY, [f"run.storage={fixed['cfg'].run.storage}", "vae.source=random", "fid.n_ref=25",
                             "fid.batch_size=10"])
    assert [c["take"] for c in scoring.reference_chunks(cfg, "test", 25)] == [20, 5]
    ref, uri, _ = scoring.reference_stats(cfg)
    want = fid.FeatureStats.from_features(fid.inception_features(fixed["real"][:25], 10))
    assert ref.count == 25
    np.testing.assert_allclose(ref.mu, want.mu, rtol=1e-5)  # the same 25 images (float32 rounding apart)
    np.testing.assert_allclose(ref.sigma, want.sigma, rtol=0, atol=1e-5)

    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda u: reads.append(u) or real_read(u))
    hit, hit_uri, _ = scoring.cached_reference(cfg)
    assert hit is not None and hit_uri == uri and np.array_equal(hit.sigma, ref.sigma)
    assert [u for u in reads if not u.startswith(uri)] == []  # no shard was read


# ---------------------------------------------------------------------- cheap checks, no Ray cluster


def test_a_shard_of_rejects_only_adds_nothing(tmp_path):
    """A reference shard whose every record is rejected scores as zero images, not a crash."""
    import json

    from pipeline import paths

    cfg = config.load(TINY, [f"run.storage={tmp_path}", "vae.source=random"])
    uri = storage.join(paths.raw(cfg), "test", "00000.tar")
    storage.write_bytes(uri, build_tar([("bad", b"not an image", "a broken one", "png", {})]))
    row = scoring.ImageScorer(cfg.to_dict(), classify=False, nearest_images=0)(
        {"job": [json.dumps({"set": scoring.REFERENCE, "kind": "shard", "uri": uri, "take": -1, "chunk": 0})]})
    assert row["count"] == [0] and row["images"] == [0] and not row["total"].any()


def test_set_and_sweep_names_never_collide():
    from pipeline.eval.generate import ImageSet, generate_sets
    from pipeline.eval.run import sweep_names

    cfg = config.load(TINY, ["eval.sweep_images=2", "eval.sweep_guidance=[1.2345671, 1.2345674, 2]",
                             "eval.sweep_samplers=[ddim:4]", "generate.sampler=ddim", "generate.steps=4"])
    names = sweep_names(cfg)  # ddim:4 at guidance 2 is in both sweeps: one folder
    assert len(names) == 3 and len(set(names.values())) == 3, names
    assert names[("ddim", 4, 2.0)] == "sweep-ddim4-g2"
    twice = [ImageSet.of(cfg, "same", ["a"]), ImageSet.of(cfg, "same", ["b"])]
    with pytest.raises(ValueError, match="must differ"):
        generate_sets(cfg, {}, "unused", twice)
    with pytest.raises(ValueError, match="reference"):
        scoring.image_chunks(scoring.REFERENCE, "out", ["a"], 4, 2)
