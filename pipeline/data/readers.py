"""Raw shards -> records -> usable (key, image, caption): as a Ray dataset (encode, the autoencoder's
training set) or read on the calling process without Ray (a report's reconstructions, an actor's
reference images).

One rule for "usable" everywhere (encode's actors apply the same `check_record`): a record the
parser flagged, or whose image or caption fails `check_record`, is left out here (encode sends it
to the rejects table). Images come out decoded exactly as encode decodes them: same size, same crop.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline import paths, storage
from pipeline.data import schema
from pipeline.data.decode import check_record, clean_caption


def parse_shard(data: bytes, source: str, cfg_data) -> list[dict]:
    """One whole shard (tar or parquet bytes) -> raw records with uniform column types.
    A corrupt shard becomes one reject record keyed by the shard, never an exception."""
    from pipeline.data.shards import read_parquet_shard, read_webdataset_shard

    if cfg_data.format == "webdataset":
        records = read_webdataset_shard(data, source)
    else:
        records = read_parquet_shard(data, source, image_col=cfg_data.image_col, caption_col=cfg_data.caption_col)
    return [_uniform(r) for r in records]


def _parse_row(row: dict, cfg_data) -> list[dict]:
    return parse_shard(row["bytes"], row["path"], cfg_data)


def _uniform(r: dict) -> dict:
    reason = r.get("reason")
    caption = r.get("caption")
    if reason is None and caption is None and r.get("image") is not None:
        reason = schema.REASON_MISSING_CAPTION
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            caption, reason = "", reason or schema.REASON_CAPTION_NOT_UTF8
    return {
        "key": str(r.get("key") or ""),
        "image": bytes(r.get("image") or b""),
        "caption": caption or "",
        "source": str(r.get("source") or ""),
        "reason": reason or "",
    }


def list_split_shards(cfg, split: str) -> list[str]:
    from pipeline.data.shards import list_shards

    prefix = storage.join(paths.raw(cfg), split)
    shards = list_shards(prefix, cfg.data.format)
    if not shards:
        raise FileNotFoundError(
            f"no {cfg.data.format} shards under {prefix}: run `python -m jobs.ingest` first, "
            f"or point data.input_uri at a prefix holding train/ and test/ shards"
        )
    return shards


def read_raw(cfg, split: str):
    """A Ray Dataset of raw records (key, image bytes, caption, source, reason) for one split, and the
    number of shards (the autoencoder's training images come from here)."""
    import ray

    shards = list_split_shards(cfg, split)
    # Whole shards as bytes: our parsers turn a corrupt member (or shard) into a reject row, where
    # read_webdataset/read_parquet would fail the task or drop it silently.
    ds = ray.data.read_binary_files([storage.ray_path(s) for s in shards], include_paths=True,
                                    filesystem=storage.ray_filesystem(shards[0]))  # io timeouts and attempts
    return ds.flat_map(_parse_row, fn_kwargs={"cfg_data": cfg.data}), len(shards)


def decode_batch(batch: dict, image_size: int) -> dict:
    """Raw records -> key, caption, image (uint8 N x S x S x 3; zeros for rejects), reason ('' if ok)."""
    n = len(batch["key"])
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    captions, reasons = [], []
    for i in range(n):
        reason = batch["reason"][i]
        caption = batch["caption"][i]
        if not reason:
            array, reason = check_record(batch["key"][i], batch["image"][i] or None, caption, image_size)
            if array is not None:
                images[i] = array
                caption, _ = clean_caption(caption)
        captions.append(caption if not reason else "")
        reasons.append(reason or "")
    return {"key": list(batch["key"]), "source": list(batch["source"]), "caption": captions,
            "image": images, "reason": reasons}


def image_dataset(cfg, split: str = "train"):
    """Decoded usable images (columns `key`, `image`: uint8 S x S x 3) as a Ray dataset: the autoencoder's training set."""
    raw, _ = read_raw(cfg, split)
    decoded = raw.map_batches(decode_batch, fn_kwargs={"image_size": cfg.data.image_size}, batch_size=256,
                              batch_format="numpy")
    return decoded.filter(lambda r: r["reason"] == "").select_columns(["key", "image"])


def shard_records(data: bytes, uri: str, cfg_data) -> Iterator[tuple[str, np.ndarray, str]]:
    """The usable records of one shard's bytes, in shard order: (key, uint8 HWC image, caption)."""
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
    shards = {uri.rsplit("/", 1)[-1]: storage.size(uri) for uri in list_split_shards(cfg, split)}
    return {"raw_uri": paths.raw(cfg), "split": split, "format": cfg.data.format, "shards": shards,
            "image_size": cfg.data.image_size, "limit": limit}
