"""The ingest stage: a built-in dataset -> img2dataset-layout shards in object storage.

Each split goes to `<raw_uri>/<split>/` as webdataset tars (or parquet). Every shard is written in
one atomic PUT; the split's `_COMMITTED` marker (with counts and the settings that produced it) is
written last, and a later run with the same settings reuses it instead of re-rendering.
"""

from __future__ import annotations

import logging
import time

from pipeline import paths, storage
from pipeline.config import ConfigError
from pipeline.data import sources
from pipeline.data.shards import write_parquet_shards, write_webdataset_shards

log = logging.getLogger(__name__)


def source_options(cfg) -> dict:
    """The config's options for the built-in source (passed to sources.iter_source)."""
    if cfg.data.source == "fashion_mnist" and cfg.data.source_dir:
        return {"root": cfg.data.source_dir}
    if cfg.data.source == "emoji" and (cfg.data.emoji_names or cfg.data.emoji_renders != 1):
        opts = {"names": list(cfg.data.emoji_names), "renders": cfg.data.emoji_renders}
        try:  # the sample generator is lazy: check the names here, against the key that set them
            counts = {split: sources.count_source("emoji", split, **opts) for split in sources.SPLITS}
        except ValueError as e:
            raise ConfigError(f"data.emoji_names: {e}") from None
        empty = [split for split, n in counts.items() if n == 0]
        if empty:
            raise ConfigError(
                f"data.emoji_names / data.emoji_renders: {len(cfg.data.emoji_names)} emoji x "
                f"{cfg.data.emoji_renders} renders leave the {' and '.join(empty)} split empty "
                f"({counts}); use more renders (each goes to test with probability 0.1) or more emoji")
        return opts
    return {}


def ingest(cfg) -> dict:
    if cfg.data.source == "shards":
        print(f"ingest: data.source=shards: using your shards at {paths.raw(cfg)} as they are")
        return {}
    counts = {}
    opts = source_options(cfg)  # checked once, before either split is touched
    for split, limit in (("train", cfg.data.n_train), ("test", cfg.data.n_test)):
        prefix = storage.join(paths.raw(cfg), split)
        settings = {"source": cfg.data.source, "split": split, "limit": limit, "format": cfg.data.format,
                    "shard_size": cfg.data.shard_size, "source_dir": cfg.data.source_dir}
        if cfg.data.source == "emoji" and opts:  # only then: existing markers of other settings stay valid
            settings["options"] = opts
        marker = storage.join(prefix, storage.COMMIT_MARKER)
        if storage.exists(marker):
            done = storage.read_json(marker)
            if done.get("settings") == settings:
                print(f"ingest: reusing {done['count']} {split} items at {prefix}")
                counts[split] = done["count"]
                continue
        storage.rm(prefix)  # stale or partial: never mixed with new shards
        t0 = time.time()
        records = sources.iter_source(cfg.data.source, split, limit=limit or None, **opts)
        if cfg.data.format == "webdataset":
            written = write_webdataset_shards(records, prefix, cfg.data.shard_size)
        else:
            written = write_parquet_shards(records, prefix, cfg.data.shard_size,
                                           image_col=cfg.data.image_col, caption_col=cfg.data.caption_col)
        n = int(written["num_records"])
        storage.write_commit_marker(prefix, {"count": n, "settings": settings, "shards": written.get("shards")})
        print(f"ingest: {n} {split} items from {cfg.data.source} -> {prefix} ({time.time() - t0:.1f}s)")
        counts[split] = n
    return counts
