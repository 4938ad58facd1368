"""Raw shards -> usable (key, image, caption) records, on the driver or in a worker, without Ray.

One rule for "usable" everywhere (encode's actors apply the same `check_record`): a record the
parser flagged, or whose image or caption fails `check_record`, is left out here (encode sends it
to the rejects table). Images come out decoded exactly as encode decodes them: same size, same crop.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline import paths, storage
from pipeline.data.decode import check_record


def shard_records(data: bytes, uri: str, cfg_data) -> Iterator[tuple[str, np.ndarray, str]]:
    """The usable records of one shard's bytes, in shard order: (key, uint8 HWC image, caption)."""
    from pipeline.data.encode import parse_shard

    for r in parse_shard(data, uri, cfg_data):
        if r["reason"]:
            continue
        array, _ = check_record(r["key"], r["image"], r["caption"], cfg_data.image_size)
        if array is not None:
            yield r["key"], array, r["caption"]


def split_records(cfg, split: str = "test", limit: int = 0) -> tuple[np.ndarray, list[str]]:
    """The first `limit` (0: all) usable images of a split in shard order, and their captions.
    Reads on the calling process: for small sets (a report's 16 reconstructions, an actor's
    reference images), not for a whole split at scale (see pipeline/eval/scoring.py)."""
    from pipeline.data.encode import list_split_shards

    images, captions = [], []
    for uri in list_split_shards(cfg, split):
        for _, image, caption in shard_records(storage.read_bytes(uri), uri, cfg.data):
            images.append(image)
            captions.append(caption)
            if limit and len(images) >= limit:
                return np.stack(images), captions
    if not images:
        raise ValueError(f"no usable images in the {split} split under {paths.raw(cfg)}")
    return np.stack(images), captions


def split_images(cfg, split: str = "test", limit: int = 0) -> np.ndarray:
    """split_records without the captions."""
    return split_records(cfg, split, limit)[0]


def split_identity(cfg, split: str, limit: int = 0) -> dict:
    """What a split's first `limit` usable images are a function of, from the shard listing alone
    (names and sizes; nothing is read or decoded): keys caches of statistics over them."""
    from pipeline.data.encode import list_split_shards

    shards = {uri.rsplit("/", 1)[-1]: storage.size(uri) for uri in list_split_shards(cfg, split)}
    return {"raw_uri": paths.raw(cfg), "split": split, "format": cfg.data.format, "shards": shards,
            "image_size": cfg.data.image_size, "limit": limit}
