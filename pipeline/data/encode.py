"""The encode stage on Ray Data: raw shards -> (T5 + VAE actors, one shard at a time) -> latent parquet.

    list the raw shards of each split                        the unit of work and of commit is one shard
    from_items(shards) -> map_batches(EncodeShard, batch_size=1, concurrency=num_actors)
        each actor reads its shard, parses and decodes it (CPU), runs the frozen T5 and VAE encoder, and
        writes <split>/<stem>.parquet, rejects/<split>/<stem>.parquet and, last, a done record
        (pipeline/data/encode_shard.py); only counts come back to the driver
    manifest.json, null_text.npz and _COMMITTED last, once every shard is done

A rerun (after a crash or a kill) keeps the shards whose done record verifies and encodes the rest, so
a killed encode loses only the shards that were in flight, and the rerun's files are byte-identical to
an uninterrupted run's. n_in = n_encoded + n_rejected is checked per shard and per split.
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np

from pipeline import paths, storage
from pipeline.data import schema
from pipeline.data.latents import committed_files, file_sizes, load_manifest
from pipeline.data.readers import list_split_shards
from pipeline.devices import resolve_use_gpu, start_whole_pool

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


# ---- CPU stage: raw rows -> decoded rows (pure functions, used by Ray tasks) ---------------------

# ---- GPU/CPU actor stage: the frozen encoders ----------------------------------------------------

class EncodeLatents:
    """The frozen encoders, built once (per actor, in EncodeShard's __init__); one batch in, latents out."""

    def __init__(self, cfg_dict: dict):
        import torch

        from pipeline.config import from_dict
        from pipeline.models.text import build_text_encoder
        from pipeline.models.vae import build_vae_for

        cfg = from_dict(cfg_dict)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.text = build_text_encoder(cfg.text_encoder, cfg.run.seed, self.device)
        self.vae, self.vae_identity = build_vae_for(cfg, self.device)

    def __call__(self, batch: dict) -> dict:
        from pipeline.models.vae import encode_images

        latents = encode_images(self.vae, batch["image"], self.device).float().cpu().numpy()
        emb, mask = self.text.encode([str(c) for c in batch["caption"]], self.device)
        emb = emb.float().cpu().numpy().astype(np.float16)
        return {
            "key": batch["key"],
            "source": batch["source"],
            "caption": batch["caption"],
            "latent": latents,
            "text_emb": emb,
            "text_mask": mask.cpu().numpy().astype(np.int8),
            "reason": nonfinite_reasons(latents, emb),
        }


def nonfinite_reasons(latents: np.ndarray, text_emb: np.ndarray) -> list[str]:
    """Per row: '' or the nonfinite_latent reason (a NaN/Inf latent, or a text embedding that overflowed
    float16), so such rows go to the rejects table instead of into training."""
    out = []
    for lat, emb in zip(latents, text_emb):
        if not np.isfinite(lat).all():
            out.append(f"{schema.REASON_NONFINITE_LATENT}: the VAE gave NaN/Inf")
        elif not np.isfinite(emb).all():
            out.append(f"{schema.REASON_NONFINITE_LATENT}: the text embedding is NaN/Inf in float16")
        else:
            out.append("")
    return out


# ---- Driver ---------------------------------------------------------------------------------------

def encode_shards(cfg, shards: dict[str, list[str]], out_uri: str, enc_id: str, use_gpu: bool) -> dict[str, dict]:
    """Every shard through the EncodeShard actor pool; returns {split: counts}. Shards an earlier run
    finished are verified and kept by the actors (`reused_shards`), the rest encoded."""
    import ray

    from pipeline.data.encode_shard import EncodeShard

    items = [{"split": split, "shard": uri} for split, uris in shards.items() for uri in uris]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EncodeShard,
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "out_uri": out_uri, "expected_encoder_id": enc_id},
        batch_size=1,
        concurrency=cfg.encode.num_actors,
        num_gpus=1 if use_gpu else 0,
        batch_format="numpy",
    )
    start_whole_pool(ds)  # every actor up first: the pool spreads over the nodes even for a few shards
    records: dict[str, dict[str, dict]] = {split: {} for split in shards}
    for row in ds.iter_rows():
        split, shard, rec = str(row["split"]), str(row["shard"]), json.loads(str(row["record"]))
        rec["reused"], rec["node"] = bool(row["reused"]), str(row["node"])
        records[split][shard] = rec
        log.info("encode %s: %s %s (%d in, %d encoded, %d rejected)", split, shard.rsplit("/", 1)[-1],
                 "reused" if rec["reused"] else "encoded", rec["n_in"], rec["n_encoded"], rec["n_rejected"])
    counts = {}
    for split, uris in shards.items():
        done = records[split]
        if sorted(done) != sorted(uris):  # every shard exactly once, or nothing is committed
            raise RuntimeError(f"encode {split}: {len(done)} shards came back for {len(uris)} listed")
        by_reason: dict[str, int] = {}
        for rec in done.values():
            for code, n in rec["rejects_by_reason"].items():
                by_reason[code] = by_reason.get(code, 0) + n
        c = {"n_shards": len(uris), "reused_shards": sum(r["reused"] for r in done.values()),
             "n_in": sum(r["n_in"] for r in done.values()), "n_encoded": sum(r["n_encoded"] for r in done.values()),
             "n_rejected": sum(r["n_rejected"] for r in done.values()), "rejects_by_reason": by_reason,
             "nodes": {n: sum(r["node"] == n for r in done.values()) for n in sorted({r["node"] for r in done.values()})}}
        if c["n_in"] != c["n_encoded"] + c["n_rejected"] or c["n_rejected"] != sum(by_reason.values()):
            raise RuntimeError(f"encode {split}: counts do not reconcile: {c}")
        counts[split] = c
        log.info("encode %s: %s", split, c)
    _remove_strays(out_uri, records)
    return counts


def _remove_strays(out_uri: str, records: dict[str, dict[str, dict]]) -> None:
    """Delete files in the shard folders that no current shard wrote (a shard removed from the input
    since an earlier attempt), so that `_COMMITTED` lists exactly this run's files."""
    from pipeline.data.encode_shard import output_names

    for split, done in records.items():
        want: dict[str, set[str]] = {}  # folder (relative) -> file names the records account for
        for shard, rec in done.items():
            for kind, rel in output_names(split, shard).items():
                folder, name = rel.rsplit("/", 1)
                want.setdefault(folder, set())
                if kind == "record" or rec["files"][kind]:
                    want[folder].add(name)
        for folder, names in want.items():
            for uri in storage.ls(storage.join(out_uri, *folder.split("/"))):
                if uri.rstrip("/").rsplit("/", 1)[-1] not in names:
                    log.warning("encode: removing %s: no shard of this run wrote it", uri)
                    storage.rm(uri)


def encode(cfg, splits=SPLITS, force: bool = False) -> dict:
    """Encode every split into `paths.latents(cfg)`; returns the manifest. Skips work already committed
    with the same config (the latents location is keyed by a hash of data, text encoder, VAE, seed),
    and, after an interrupted run, every shard whose done record verifies."""
    import torch

    from pipeline.data.encode_shard import REJECTS_DIR, encoder_id
    from pipeline.models.text import build_text_encoder
    from pipeline.models.vae import build_vae_for, latent_shape

    out = paths.latents(cfg)
    if storage.is_committed(out) and not force:
        try:
            manifest = load_manifest(out)
            for split in set(splits) & set(manifest["splits"]):
                if manifest["splits"][split]["n_encoded"]:
                    committed_files(out, split)
        except storage.CorruptArtifact as e:
            log.error("encode: NOT reusing %s as committed: %s; checking it shard by shard", out, e)
            manifest = {"splits": {}}
        if set(splits) <= set(manifest["splits"]):
            log.info("encode: %s already committed, reusing it", out)
            print(f"encode: reusing committed latents at {out}")
            return manifest
    if force:
        storage.rm(out)
    else:
        # The marker goes first: while shards are redone the folder is not a committed dataset.
        storage.rm(storage.join(out, storage.COMMIT_MARKER))
    t0 = time.time()
    text = build_text_encoder(cfg.text_encoder, cfg.run.seed)
    vae, vae_identity = build_vae_for(cfg)
    enc_id = encoder_id(text.identity, vae_identity, cfg)
    null_emb, null_mask = text.encode([""])
    buf = io.BytesIO()
    np.savez(buf, emb=null_emb[0].numpy().astype(np.float32), mask=null_mask[0].numpy().astype(np.int64))

    shards = {s: list_split_shards(cfg, s) for s in splits}
    split_counts = encode_shards(cfg, shards, out, enc_id, resolve_use_gpu(cfg.encode.use_gpu))
    untrained = not (text.identity["trained"] and vae_identity["trained"])
    manifest = {
        "splits": split_counts,
        "n_in": sum(c["n_in"] for c in split_counts.values()),
        "n_encoded": sum(c["n_encoded"] for c in split_counts.values()),
        "n_rejected": sum(c["n_rejected"] for c in split_counts.values()),
        "n_shards": sum(c["n_shards"] for c in split_counts.values()),
        "reused_shards": sum(c["reused_shards"] for c in split_counts.values()),
        "encoder_id": enc_id,
        "latent_shape": list(latent_shape(vae, cfg.data.image_size)),
        "text_shape": [cfg.text_encoder.max_length, text.dim],
        "text_encoder": text.identity,
        "vae": vae_identity,
        "untrained": untrained,
        "raw_uri": paths.raw(cfg),
        "config": {k: cfg.to_dict()[k] for k in ("data", "text_encoder", "vae")},
        "seconds": round(time.time() - t0, 2),
        "torch": torch.__version__,
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    storage.write_bytes(storage.join(out, "null_text.npz"), buf.getvalue())
    storage.write_bytes(storage.join(out, "manifest.json"), manifest_bytes)
    # The marker, last, records the hashes of the small files every later stage reads back.
    storage.write_commit_marker(out, {"n_encoded": manifest["n_encoded"], "sha256": {
        "manifest.json": storage.sha256_bytes(manifest_bytes), "null_text.npz": storage.sha256_bytes(buf.getvalue())},
        "files": {split: file_sizes(storage.join(out, split)) for split in splits},
        "rejects": {split: file_sizes(storage.join(out, REJECTS_DIR, split)) for split in splits}})
    if manifest["reused_shards"]:
        print(f"encode: kept {manifest['reused_shards']} of {manifest['n_shards']} shards an earlier run finished")
    if untrained:
        which = [n for n, ident in (("T5 text encoder", text.identity), ("VAE", vae_identity)) if not ident["trained"]]
        print(f"encode: NOTE the {' and the '.join(which)} {'is' if len(which) == 1 else 'are'} UNTRAINED (random init)")
    return manifest


