"""What differs between the two models this project trains, as one interface: a Task.

The loop (loop.py), the Ray Train worker, `fit` (trainer.py), the checkpoints and the resume rules are
shared and never ask which task they run. A Task says where its checkpoints live, what it trains on
(read once on the driver), how to build its training state, its step, and which settings its
checkpoints depend on:

    DenoiserTask  the latent denoiser on the encoded dataset: DDPM objective, guidance dropout, EMA
    VAETask       the autoencoder on decoded images: the ELBO (pipeline/train/vae_step.py)
"""

from __future__ import annotations

import numpy as np

from pipeline import paths


class Task:
    """One trainable model. Subclasses set the class attributes and implement the methods."""

    name: str
    """Names its outputs: <task>_metrics.json, <task>_starts.json, samples/<task>/."""
    resume_sections: tuple[str, ...]
    """Config sections the checkpoint's weights depend on: resuming under other values would silently
    continue a different model (e.g. a denoiser trained on another noise schedule)."""
    resume_keys: tuple[tuple[str, str], ...]
    """Single keys that fix which samples each step takes (pipeline.train.data): the checkpoint's data
    position means nothing under another seed or batch size. The worker count may change."""
    summary_keys: tuple[str, ...] = ()
    """Metrics of the last report that `fit`'s summary carries besides the loss."""

    def loop(self, cfg):
        """Its LoopSection (steps, batch size, workers, checkpoints)."""
        raise NotImplementedError

    def run_uri(self, cfg) -> str:
        """Where its checkpoint folders live (Ray Train's experiment folder)."""
        raise NotImplementedError

    def prepare(self, cfg) -> dict:
        """On the driver, before training: what every worker needs besides the data (JSON-able);
        `note`, if set, is printed by fit."""
        return {}

    def data_identity(self, cfg) -> dict:
        """Names the data trained on, recorded in each checkpoint: a resume on other data is refused."""
        return {}

    def table(self, cfg, prepared: dict) -> dict[str, np.ndarray]:
        """The whole training set as arrays (with a `key` column), read once on the driver."""
        raise NotImplementedError

    def build_state(self, cfg, prepared: dict, *, rank: int = 0, wrap=None):
        """A fresh TrainState (pipeline.train.step); `wrap` makes the trained module (DDP)."""
        raise NotImplementedError

    def step(self, state, batch: dict, cfg, *, autocast_dtype=None) -> dict:
        """One optimizer step on a batch of the table's rows (tensors)."""
        raise NotImplementedError

    def resume_conflicts(self, saved_cfg: dict, cfg_dict: dict) -> list[str]:
        """`section.key: checkpoint X, config Y` for each resume key or section value that differs."""
        out = []
        for section, key in self.resume_keys:
            old, new = saved_cfg.get(section, {}).get(key), cfg_dict.get(section, {}).get(key)
            if old != new:
                out.append(f"{section}.{key}: checkpoint {old!r}, config {new!r}")
        for section in self.resume_sections:
            old, new = saved_cfg.get(section, {}), cfg_dict.get(section, {})
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    out.append(f"{section}.{key}: checkpoint {old.get(key)!r}, config {new.get(key)!r}")
        return out


class DenoiserTask(Task):
    name = "denoiser"
    resume_sections = ("schedule", "denoiser", "text_encoder", "vae")
    resume_keys = (("run", "seed"), ("train", "batch_size"))

    def loop(self, cfg):
        return cfg.train

    def run_uri(self, cfg) -> str:
        return paths.denoiser_run(cfg)

    def prepare(self, cfg) -> dict:
        from pipeline.data.latents import load_manifest, load_null_text

        latents = paths.latents(cfg)
        manifest = load_manifest(latents)
        null_emb, null_mask = load_null_text(latents)
        note = "training on latents of UNTRAINED encoders (see the encode manifest)" if manifest["untrained"] else ""
        return {"manifest": manifest, "null_emb": null_emb.tolist(), "null_mask": null_mask.tolist(), "note": note}

    def data_identity(self, cfg) -> dict:
        return {"latents_uri": paths.latents(cfg)}  # keyed by the VAE's weights: a retrained VAE changes it

    def table(self, cfg, prepared: dict) -> dict[str, np.ndarray]:
        """The latents, files exactly as `_COMMITTED` lists them."""
        from pipeline.data.latents import numpy_column, read_latents

        manifest = prepared["manifest"]
        table = read_latents(paths.latents(cfg), "train", ["key", "latent", "text_emb", "text_mask"])
        return {"key": np.asarray(table.column("key").to_pylist(), dtype=str),
                "latent": numpy_column(table, "latent", manifest["latent_shape"], np.float32),
                "text_emb": numpy_column(table, "text_emb", manifest["text_shape"], np.float16),
                "text_mask": numpy_column(table, "text_mask", manifest["text_shape"][:1], np.int8)}

    def build_state(self, cfg, prepared: dict, *, rank: int = 0, wrap=None):
        from pipeline.train.step import build_train_state

        return build_train_state(cfg, prepared["manifest"], prepared["null_emb"], prepared["null_mask"],
                                 rank=rank, wrap=wrap)

    def step(self, state, batch: dict, cfg, *, autocast_dtype=None) -> dict:
        from pipeline.train.step import train_step

        return train_step(state, batch, cfg, autocast_dtype=autocast_dtype)


class VAETask(Task):
    name = "vae"
    resume_sections = ("vae",)
    resume_keys = (("run", "seed"), ("vae_train", "batch_size"))
    summary_keys = ("rec", "kl", "psnr")

    def loop(self, cfg):
        return cfg.vae_train

    def run_uri(self, cfg) -> str:
        return paths.vae_run(cfg)

    def table(self, cfg, prepared: dict) -> dict[str, np.ndarray]:
        """Decoded training images."""
        from pipeline.data.readers import image_dataset

        batches = list(image_dataset(cfg).iter_batches(batch_size=1024, batch_format="numpy"))
        if not batches:
            raise RuntimeError("no decodable training images: check the ingest's rejects")
        return {k: np.concatenate([b[k] for b in batches]) for k in ("key", "image")}

    def build_state(self, cfg, prepared: dict, *, rank: int = 0, wrap=None):
        from pipeline.train.vae_step import build_vae_train_state

        return build_vae_train_state(cfg, rank=rank, wrap=wrap)

    def step(self, state, batch: dict, cfg, *, autocast_dtype=None) -> dict:
        from pipeline.train.vae_step import vae_train_step

        return vae_train_step(state, batch, cfg, autocast_dtype=autocast_dtype)


TASKS: dict[str, Task] = {t.name: t for t in (DenoiserTask(), VAETask())}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]
