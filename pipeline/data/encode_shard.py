"""One raw shard, the unit of work and of commit of the encode stage, and the records that let a rerun
skip the shards an earlier (killed) run finished.

Layout under the latents folder (`paths.latents(cfg)`), per input shard `<split>/<stem>.tar|.parquet`:

    <split>/<stem>.parquet            finite rows: key, caption, latent, text_emb, text_mask (absent if none)
    rejects/<split>/<stem>.parquet    key, source, reason (absent if none)
    _shards/<split>/<stem>.json       the done record, written LAST: counts, the encoder identity, the
                                      input shard's size and sha256, each output file's size and sha256

Each file is one atomic PUT. The encoder batches depend only on the shard (its rows in order, in
batches of encode.batch_size), so the bytes are the same whichever actor, run or rerun encodes it. A
done record is reused only when it matches the encoder identity and the input's size, and every file
it names has its recorded size and sha256 (checked in the actor, not the driver: no latents travel
through the driver); one that fails is reported and the shard encoded again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np

from pipeline import storage
from pipeline.data import schema

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
SHARDS_DIR = "_shards"
REJECTS_DIR = "rejects"
LATENT_COLUMNS = ("key", "caption", "latent", "text_emb", "text_mask")


def stem(shard_uri: str) -> str:
    """`.../train/00003.tar` -> `00003`: the name of the shard's outputs."""
    name = shard_uri.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0]


def output_names(split: str, shard_uri: str) -> dict[str, str]:
    """Paths relative to the latents folder of one shard's files (latents, rejects, done record)."""
    s = stem(shard_uri)
    return {"latents": f"{split}/{s}.parquet", "rejects": f"{REJECTS_DIR}/{split}/{s}.parquet",
            "record": f"{SHARDS_DIR}/{split}/{s}.json"}


def encoder_id(text_identity: dict, vae_identity: dict, cfg) -> str:
    """What makes the bytes of a shard's outputs: both encoders, the data/encoder settings and the
    batch size (batched convolutions can differ bitwise with batch composition). Records of another
    identity are never reused."""
    ident = {"format": RECORD_FORMAT, "text_encoder": text_identity, "vae": vae_identity,
             "config": {k: cfg.to_dict()[k] for k in ("data", "text_encoder", "vae")},
             "batch_size": cfg.encode.batch_size}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def latents_table(rows: dict):
    """The latent parquet's table; the tensor columns in Ray Data's tensor type, as its readers expect."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({
        "key": pa.array(rows["key"], pa.string()),
        "caption": pa.array(rows["caption"], pa.string()),
        "latent": ArrowTensorArray.from_numpy(np.stack(rows["latent"]).astype(np.float32)),
        "text_emb": ArrowTensorArray.from_numpy(np.stack(rows["text_emb"]).astype(np.float16)),
        "text_mask": ArrowTensorArray.from_numpy(np.stack(rows["text_mask"]).astype(np.int8)),
    })


def rejects_table(rejects: list[dict]):
    import pyarrow as pa

    return pa.table({c: pa.array([str(r[c]) for r in rejects], pa.string()) for c in schema.REJECT_COLUMNS})


class EncodeShard:
    """Ray Data callable class: one row (split, shard URI) in, that shard's counts out (its outputs go
    straight to storage). The encoders are built once per actor, in __init__."""

    def __init__(self, cfg_dict: dict, out_uri: str, expected_encoder_id: str):
        from pipeline.config import from_dict
        from pipeline.data.encode import EncodeLatents

        self.cfg = from_dict(cfg_dict)
        self.enc = EncodeLatents(cfg_dict)
        self.out = out_uri
        self.node = _node_address()
        self.encoder_id = encoder_id(self.enc.text.identity, self.enc.vae_identity, self.cfg)
        if self.encoder_id != expected_encoder_id:  # the driver's models and this actor's must agree
            raise RuntimeError(f"encode actor: encoder identity {self.encoder_id} != the driver's {expected_encoder_id}")

    def __call__(self, batch: dict) -> dict:
        split, shard = str(batch["split"][0]), str(batch["shard"][0])
        record = self.reusable(split, shard)
        reused = record is not None
        if not reused:
            record = self.encode_shard(split, shard)
        return {"split": [split], "shard": [shard], "reused": [reused], "record": [json.dumps(record, sort_keys=True)],
                "node": [self.node]}

    # ---- a rerun: is this shard's done record still true? -------------------------------------------

    def reusable(self, split: str, shard: str) -> dict | None:
        """The shard's done record if every check passes; None if there is none or one fails (said loudly)."""
        names = output_names(split, shard)
        record_uri = storage.join(self.out, names["record"])
        if not storage.exists(record_uri):
            return None
        try:
            record = storage.read_json(record_uri)
            problem = self._check(record, split, shard, names)
        except storage.StorageUnavailable:
            raise  # storage down or stalled says nothing about the shard: never redo or remove it for that
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"unreadable record ({type(e).__name__}: {e})"
        if problem is None:
            return record
        msg = f"encode: NOT reusing {split}/{stem(shard)} ({record_uri}): {problem}; encoding the shard again"
        log.error(msg)
        print(msg, flush=True)
        return None

    def _check(self, record: dict, split: str, shard: str, names: dict) -> str | None:
        if record.get("format") != RECORD_FORMAT or record.get("split") != split or record["input"]["uri"] != shard:
            return "written for another format, split or shard"
        if record.get("encoder_id") != self.encoder_id:
            return f"encoder identity {record.get('encoder_id')} differs from this run's {self.encoder_id}"
        if storage.size(shard) != record["input"]["size"]:
            return "the input shard has another size than when it was encoded"
        if storage.sha256_bytes(storage.read_bytes(shard)) != record["input"]["sha256"]:  # one GET: cheap next to encoding
            return "the input shard has changed since it was encoded (sha256)"
        if record["n_in"] != record["n_encoded"] + record["n_rejected"]:
            return "its counts do not reconcile"
        for kind in ("latents", "rejects"):
            want, uri = record["files"][kind], storage.join(self.out, names[kind])
            if want is None:
                if storage.exists(uri):
                    return f"{names[kind]} exists but the record says the shard wrote none"
                continue
            if storage.size(uri) != want["size"]:
                return f"{names[kind]} is missing or has another size than recorded"
            if storage.sha256_bytes(storage.read_bytes(uri)) != want["sha256"]:
                return f"{names[kind]} does not match its recorded sha256 (corrupted)"
        return None

    # ---- the work ----------------------------------------------------------------------------------

    def encode_shard(self, split: str, shard: str) -> dict:
        """Parse, decode and encode one shard; write its latents and rejects, then its done record."""
        from pipeline.data.readers import decode_batch, parse_shard

        names = output_names(split, shard)
        storage.rm(storage.join(self.out, names["record"]))  # a redo: the old record must not outlive its files
        data = storage.read_bytes(shard)
        records = parse_shard(data, shard, self.cfg.data)
        bsz, size = self.cfg.encode.batch_size, self.cfg.data.image_size
        rejects: list[dict] = []
        rows: dict[str, list] = {c: [] for c in LATENT_COLUMNS}
        pending: list[dict] = []  # decoded good rows not yet encoded: batches of exactly bsz (the last may be short)
        for start in range(0, len(records), bsz):
            chunk = records[start:start + bsz]
            dec = decode_batch({k: [r[k] for r in chunk] for k in chunk[0]}, size)
            for i, reason in enumerate(dec["reason"]):
                if reason:
                    rejects.append({"key": dec["key"][i], "source": dec["source"][i], "reason": reason})
                else:
                    pending.append({k: dec[k][i] for k in ("key", "source", "caption", "image")})
            while len(pending) >= bsz:
                self._encode(pending[:bsz], rows, rejects)
                pending = pending[bsz:]
        if pending:
            self._encode(pending, rows, rejects)
        n_in, n_encoded = len(records), len(rows["key"])
        if n_in != n_encoded + len(rejects):
            raise RuntimeError(f"encode {shard}: {n_in} in != {n_encoded} encoded + {len(rejects)} rejected")
        files = {"latents": latents_table(rows) if n_encoded else None,
                 "rejects": rejects_table(rejects) if rejects else None}
        written = {}
        for kind, table in files.items():
            uri = storage.join(self.out, names[kind])
            if table is None:
                storage.rm(uri)  # left by an earlier attempt at this shard: not part of this result
                written[kind] = None
                continue
            blob = _parquet_bytes(table)
            storage.write_bytes(uri, blob)
            written[kind] = {"size": len(blob), "sha256": storage.sha256_bytes(blob)}
        by_reason: dict[str, int] = {}
        for r in rejects:
            code = schema.reason_code(r["reason"])
            by_reason[code] = by_reason.get(code, 0) + 1
        record = {"format": RECORD_FORMAT, "split": split, "encoder_id": self.encoder_id,
                  "input": {"uri": shard, "size": len(data), "sha256": storage.sha256_bytes(data)},
                  "n_in": n_in, "n_encoded": n_encoded, "n_rejected": len(rejects), "rejects_by_reason": by_reason,
                  "files": written}
        storage.write_json(storage.join(self.out, names["record"]), record)  # last: the shard is done
        return record

    def _encode(self, good: list[dict], rows: dict, rejects: list[dict]) -> None:
        batch = {k: np.array([g[k] for g in good]) for k in ("key", "source", "caption")}
        batch["image"] = np.stack([g["image"] for g in good])
        out = self.enc(batch)
        for i, reason in enumerate(out["reason"]):
            if reason:
                rejects.append({"key": good[i]["key"], "source": good[i]["source"], "reason": reason})
            else:
                rows["key"].append(str(out["key"][i]))
                rows["caption"].append(str(out["caption"][i]))
                for c in ("latent", "text_emb", "text_mask"):
                    rows[c].append(out[c][i])


def _node_address() -> str:
    """The Ray node this actor runs on (for the manifest's per-node shard counts); '' outside Ray."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else ""
