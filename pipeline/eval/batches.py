"""Generate's unit of resume: fixed batches of image indices, their done records, the output's identity.

Layout of a generate output folder (`<outputs>/<out_name>/`):

    identity.json          written FIRST: what the images are a function of (checkpoint and its manifest's
                           sha256, sampler, steps, guidance, seed, number of images, prompts, batch size,
                           encoders and decoder). Another identity: the old images are removed, not trusted.
    images/NNNNNN.png      one atomic PUT each
    _batches/KKKKKK.json   batch k's done record, written after its PNGs: indices [k*B, (k+1)*B), each PNG's
                           sha256, its latents' std
    metadata.parquet, grid.png, generate.json, then _COMMITTED LAST

Batch k always holds the same indices, so its images are bitwise the same in a rerun (on CPU, batched
convolutions can differ with batch composition). A rerun keeps each batch whose record matches the
identity and whose PNGs match their hashes (checked by Ray tasks, pipeline/eval/generate.py) and makes the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np

from pipeline import storage

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
IDENTITY_FILE = "identity.json"
BATCHES_DIR = "_batches"
OUTPUT_FILES = ("metadata.parquet", "grid.png", "generate.json", storage.COMMIT_MARKER)


def image_name(index: int) -> str:
    return f"{int(index):06d}.png"


def record_uri(out: str, batch: int) -> str:
    return storage.join(out, BATCHES_DIR, f"{int(batch):06d}.json")


def batch_bounds(num_images: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each batch: fixed by (num_images, batch_size) alone."""
    return [(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]


def output_identity(cfg, manifest: dict, checkpoint_uri: str, prompts: list[str], g=None) -> dict:
    """Everything image i's bytes depend on (prompts: one per image, in index order; g: the set's
    generate settings, default cfg.generate)."""
    import torch

    from pipeline.checkpoint import MANIFEST_FILE

    g, d = g or cfg.generate, cfg.to_dict()
    return {
        "format": RECORD_FORMAT,
        "checkpoint": checkpoint_uri,
        "checkpoint_manifest_sha256": storage.sha256_bytes(storage.read_bytes(storage.join(checkpoint_uri, MANIFEST_FILE))),
        "sampler": g.sampler, "steps": g.steps, "guidance_scale": float(g.guidance_scale), "seed": g.seed,
        "num_images": g.num_images, "batch_size": g.batch_size,
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "text_encoder": manifest["text_encoder"], "vae": manifest["vae"], "latent_shape": manifest["latent_shape"],
        "config": {k: d[k] for k in ("text_encoder", "vae", "denoiser", "schedule")} | {"seed": cfg.run.seed},
        "torch": torch.__version__,
    }


def identity_sha(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def prepare(out: str, identity: dict) -> bool:
    """Make `out` hold outputs of `identity` only: keep its batches if its identity.json is this one,
    else remove them (and anything generate wrote) and write identity.json. Either way the commit marker
    goes first, so an interrupted run never looks complete. Returns whether earlier batches may be kept."""
    uri = storage.join(out, IDENTITY_FILE)
    old = None
    if storage.exists(uri):
        try:
            old = storage.read_json(uri)
        except storage.StorageUnavailable:
            raise  # storage down or stalled says nothing about what it holds: never remove work for it
        except (ValueError, OSError) as e:
            log.error("generate: unreadable %s (%s): not trusting the images beside it", uri, e)
    storage.rm(storage.join(out, storage.COMMIT_MARKER))
    if old is not None and identity_sha(old) == identity_sha(identity):
        return True
    if old is not None or storage.exists(storage.join(out, BATCHES_DIR)):
        changed = sorted(k for k in set(old or {}) | set(identity) if (old or {}).get(k) != identity.get(k))
        print(f"generate: {out} holds images of other settings ({', '.join(changed)}): removing them", flush=True)
    for name in ("images", BATCHES_DIR, *OUTPUT_FILES):
        storage.rm(storage.join(out, name))
    storage.write_json(uri, identity)
    return False


def write_record(out: str, batch: int, start: int, stop: int, ident_sha: str, pngs: list[bytes],
                 latent_std: list[float]) -> None:
    """Batch `batch`'s done record; called after its PNGs are written."""
    storage.write_json(record_uri(out, batch), {
        "format": RECORD_FORMAT, "identity_sha256": ident_sha, "batch": batch, "start": start, "stop": stop,
        "images": [{"name": image_name(i), "size": len(p), "sha256": storage.sha256_bytes(p)}
                   for i, p in zip(range(start, stop), pngs)],
        "latent_std": [float(s) for s in latent_std],
    })


def verified_latent_std(out: str, batch: int, start: int, stop: int, ident_sha: str, image_size: int) -> list | None:
    """Batch `batch`'s latent std per image if its record and every PNG verify (sizes, sha256, decodes
    to image_size x image_size RGB), else None (said loudly when a record exists but fails)."""
    from PIL import Image

    uri = record_uri(out, batch)
    if not storage.exists(uri):
        return None
    try:
        rec = storage.read_json(uri)
        if (rec.get("format"), rec.get("identity_sha256"), rec.get("batch"), rec.get("start"), rec.get("stop")) != (
                RECORD_FORMAT, ident_sha, batch, start, stop):
            raise ValueError("written for another identity or batch layout")
        for i, want in zip(range(start, stop), rec["images"], strict=True):
            data = storage.read_bytes(storage.join(out, "images", image_name(i)))
            if want["name"] != image_name(i) or len(data) != want["size"] or storage.sha256_bytes(data) != want["sha256"]:
                raise ValueError(f"{image_name(i)} does not match its recorded size and sha256")
            shape = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).shape
            if shape != (image_size, image_size, 3):
                raise ValueError(f"{image_name(i)} is {shape}, not {image_size}x{image_size}x3")
        if len(rec["latent_std"]) != stop - start:
            raise ValueError("latent_std has the wrong length")
    except storage.StorageUnavailable:
        raise  # storage down or stalled says nothing about the batch: never regenerate it for that
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("generate: NOT keeping batch %d (%s): %s; generating it again", batch, uri, e)
        print(f"generate: NOT keeping batch {batch}: {e}; generating it again", flush=True)
        return None
    return [float(v) for v in rec["latent_std"]]
