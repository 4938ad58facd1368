"""Every storage location of a run, from its config: the one module that knows the layout (README:
storage layout). Only `latents` reads storage: a trained VAE's export hash is part of the latents' key.
"""

from __future__ import annotations

import hashlib

from pipeline import storage


def raw(cfg) -> str:
    """The ingested (or user-supplied, data.input_uri) shards: <raw>/train/, <raw>/test/."""
    return cfg.data.input_uri or storage.join(cfg.run.storage, "datasets", cfg.data.source)


def vae_export(cfg) -> str:
    """Where `jobs.train_vae` exports the trained autoencoder (diffusers format)."""
    return storage.join(cfg.run.storage, "vae", cfg.run.name)


def latents(cfg) -> str:
    """Keyed by everything that changes the latents: data, encoders, seed, and for a trained VAE the
    hash of its exported weights (so retraining it never reuses stale latents)."""
    key = cfg.fingerprint("data", "text_encoder", "vae")
    if cfg.vae.source == "trained":
        marker = storage.join(vae_export(cfg), storage.COMMIT_MARKER)
        sha = storage.read_json(marker).get("sha256", "") if storage.exists(marker) else "missing"
        key = hashlib.sha256(f"{key}-{sha}".encode()).hexdigest()[:12]
    return storage.join(cfg.run.storage, "latents", f"{cfg.data.source}-{cfg.data.image_size}px-{key}")


def checkpoints(cfg) -> str:
    """Every run's checkpoints: <checkpoints>/<run.name>/ (and <run.name>-vae/)."""
    return storage.join(cfg.run.storage, "checkpoints")


def denoiser_run(cfg) -> str:
    """The denoiser's checkpoint folders (Ray Train's experiment folder): <checkpoints>/<run.name>/."""
    return storage.join(checkpoints(cfg), cfg.run.name)


def vae_run(cfg) -> str:
    """The autoencoder's checkpoint folders: <checkpoints>/<run.name>-vae/."""
    return storage.join(checkpoints(cfg), f"{cfg.run.name}-vae")


def outputs(cfg) -> str:
    """A run's outputs: generate folders, metrics, sample records, the report."""
    return storage.join(cfg.run.storage, "outputs", cfg.run.name)


def fid_stats(cfg, key: str) -> str:
    """Cached reference statistics, keyed by a hash of the reference set's identity."""
    return storage.join(cfg.run.storage, "fid_stats", f"{key}.npz")


def classifier(cfg, size: int) -> str:
    """The cached prompt-accuracy classifier."""
    return storage.join(cfg.run.storage, "classifiers", f"fashion_mnist-{size}px.safetensors")
