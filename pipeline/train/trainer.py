"""Launching the denoiser's training on Ray Train (TorchTrainer, DDP, checkpoints in object storage).

Checkpoints live at `<storage>/checkpoints/<run.name>/`, written and pruned by rank 0 through
`checkpoint_store` (Ray Train is told metrics only). Calling `fit` again with the same run name
makes the workers resume from the newest checkpoint there that verifies, and the loop continues
from its step, epoch and batch position up to the (possibly raised) `train.steps`.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np

from pipeline import paths, storage
from pipeline.data.encode import load_manifest, load_null_text
from pipeline.devices import resolve_use_gpu
from pipeline.signals import keep_python_sigint_handler
from pipeline.train import checkpoint_store

log = logging.getLogger(__name__)


def run_name(cfg, task: str = "denoiser") -> str:
    return f"{cfg.run.name}-vae" if task == "vae" else cfg.run.name


def run_uri(cfg, task: str = "denoiser") -> str:
    """Where this run's checkpoint folders live (Ray Train's experiment folder)."""
    return storage.join(paths.checkpoints(cfg), run_name(cfg, task))


def starts_uri(cfg, task: str = "denoiser") -> str:
    """JSON list of the run's worker-group starts: attempt id, fit, step and data position resumed from, nodes."""
    return storage.join(paths.outputs(cfg), f"{task}_starts.json")


def samples_uri(cfg, task: str = "denoiser") -> str:
    """Where each rank records the sample keys of every batch it trained on (pipeline.train.data.SampleLog)."""
    return storage.join(paths.outputs(cfg), "samples", task)


def audit_samples(cfg, task: str = "denoiser") -> dict:
    """Per epoch: samples trained on, missing, repeated, out of order (pipeline.train.data.audit)."""
    from pipeline.train import data

    keys = training_table(cfg, task, load_manifest(paths.latents(cfg)) if task == "denoiser" else None)["key"]
    loop = cfg.vae_train if task == "vae" else cfg.train
    return data.audit(samples_uri(cfg, task), storage.read_json(starts_uri(cfg, task)), keys, cfg.run.seed,
                      loop.batch_size)


def complete_checkpoints(cfg, task: str = "denoiser") -> list[tuple[int, str]]:
    """(step, folder) of this run's checkpoints in storage whose manifest and file sizes are in place,
    oldest first (see checkpoint_store: hashes are verified when one is loaded)."""
    return checkpoint_store.candidates(run_uri(cfg, task))


def latest_checkpoint_uri(cfg, task: str = "denoiser") -> str | None:
    """The newest checkpoint of this run that verifies (downloaded and hashed here); older ones are
    used, with an error logged, when newer ones fail verification. None if there is none."""
    return checkpoint_store.newest_trusted_uri(run_uri(cfg, task))


def check_resumable(cfg, task: str = "denoiser", data_identity: dict | None = None) -> None:
    """Raise ConfigError if this run's latest checkpoint was trained under settings its weights depend on
    (noise schedule, architectures, encoders, and for the denoiser the latent dataset, which a retrained
    VAE changes) that differ from now: fit would otherwise resume it."""
    from pipeline.config import ConfigError, from_dict
    from pipeline.train.checkpoint import resume_conflicts

    found = complete_checkpoints(cfg, task)  # the manifest's settings matter here, not its hashes
    if not found:
        return
    latest = found[-1][1]
    info = storage.read_json(storage.join(latest, "manifest.json"))
    saved = info.get("config", {})
    try:  # as this code would load it: fields added since get their defaults
        saved = from_dict(saved).to_dict()
    except ValueError:
        pass  # a section or key this version no longer has: compare what is there
    conflicts = resume_conflicts(saved, cfg.to_dict(), task)
    old_data = info.get("data_identity") or {}
    conflicts += [f"{k}: checkpoint {old_data[k]!r}, now {v!r}" for k, v in (data_identity or {}).items()
                  if k in old_data and old_data[k] != v]
    if conflicts:
        raise ConfigError(
            f"run {run_name(cfg, task)!r} has a checkpoint ({latest}) trained with other settings, which "
            f"training would resume: {'; '.join(conflicts)}. Use a new run.name, or the checkpoint's settings."
        )


def image_dataset(cfg, split: str = "train"):
    """Decoded training images (columns `key`, `image`: uint8 S x S x 3) for the autoencoder."""
    from pipeline.data.encode import decode_batch, read_raw

    raw, _ = read_raw(cfg, split)
    decoded = raw.map_batches(decode_batch, fn_kwargs={"image_size": cfg.data.image_size}, batch_size=256,
                              batch_format="numpy")
    return decoded.filter(lambda r: r["reason"] == "").select_columns(["key", "image"])


def training_table(cfg, task: str, manifest: dict | None = None) -> dict[str, np.ndarray]:
    """The whole training set as arrays in key order (pipeline.train.data): the latents for the
    denoiser (files exactly as `_COMMITTED` lists them), decoded images for the autoencoder."""
    from pipeline.data.encode import numpy_column, read_latents
    from pipeline.train import data

    if task == "vae":
        batches = list(image_dataset(cfg).iter_batches(batch_size=1024, batch_format="numpy"))
        if not batches:
            raise RuntimeError("no decodable training images: check the ingest's rejects")
        arrays = {k: np.concatenate([b[k] for b in batches]) for k in ("key", "image")}
    else:
        table = read_latents(paths.latents(cfg), "train", ["key", "latent", "text_emb", "text_mask"])
        arrays = {"key": np.asarray(table.column("key").to_pylist(), dtype=str),
                  "latent": numpy_column(table, "latent", manifest["latent_shape"], np.float32),
                  "text_emb": numpy_column(table, "text_emb", manifest["text_shape"], np.float16),
                  "text_mask": numpy_column(table, "text_mask", manifest["text_shape"][:1], np.int8)}
    return data.sort_by_key(arrays)


def fit(cfg, task: str = "denoiser") -> dict:
    """Train the denoiser (task="denoiser", on the latent dataset) or the autoencoder (task="vae", on
    decoded images) with the same loop, checkpoints and resume."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train import dist

    data_identity = {"latents_uri": paths.latents(cfg)} if task == "denoiser" else {}
    check_resumable(cfg, task, data_identity)
    checkpoint_store.remove_incomplete(run_uri(cfg, task))
    outputs = paths.outputs(cfg)
    fit_id = uuid.uuid4().hex[:12]
    loop_config: dict = {"cfg": cfg.to_dict(), "task": task, "data_identity": data_identity,
                         "run_uri": run_uri(cfg, task), "fit_id": fit_id,
                         "history_uri": storage.join(outputs, f"{task}_metrics.json"),
                         "result_uri": storage.join(outputs, f"{task}_result.json"),
                         "starts_uri": starts_uri(cfg, task),
                         "samples_uri": samples_uri(cfg, task)}
    if task == "vae":
        loop = cfg.vae_train
        manifest = None
    else:
        loop = cfg.train
        latents = paths.latents(cfg)
        manifest = load_manifest(latents)
        null_emb, null_mask = load_null_text(latents)
        if manifest["untrained"]:
            print("train: NOTE training on latents of UNTRAINED encoders (see the encode manifest)")
        loop_config |= {"manifest": manifest, "null_emb": null_emb.tolist(), "null_mask": null_mask.tolist()}
    # Read once here and shared through the object store (owned by this driver, so it outlives any
    # worker or node the run loses); each rank picks its rows by (seed, epoch, rank).
    table = training_table(cfg, task, manifest)
    loop_config["data_ref"] = ray.put(table)
    n_samples = len(table["key"])
    del table
    if n_samples < loop.batch_size:
        raise RuntimeError(f"{task}: {n_samples} training samples, fewer than one batch of {loop.batch_size}: "
                           "lower the batch size or ingest more data")
    use_gpu = resolve_use_gpu(loop.use_gpu)
    storage.ensure_bucket(paths.checkpoints(cfg))
    storage.makedirs(paths.checkpoints(cfg))
    storage.rm(loop_config["result_uri"])  # written by rank 0 at the end of this fit, never an earlier one's
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=loop.num_workers, use_gpu=use_gpu,
                                               placement_strategy=loop.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run_name(cfg, task),
            storage_path=storage.train_storage_path(paths.checkpoints(cfg)),
            storage_filesystem=storage.ray_filesystem(paths.checkpoints(cfg)),  # io timeouts/attempts
            # A lost worker or node restarts the whole group, which resumes from the newest checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=loop.max_failures),
        ),
        torch_config=dist.torch_config(),  # on a loopback cluster the store binds 127.0.0.1 only
    )
    t0 = time.time()
    # fit() installs Ray Train's SIGINT handler and leaves it in place: without this, Ctrl-C during a
    # later stage of this driver (e.g. generation) would do nothing, and during fit() would exit silently.
    with keep_python_sigint_handler():
        trainer.fit()
    metrics = storage.read_json(loop_config["result_uri"])  # rank 0's last report of this fit
    attempts = [a for a in storage.read_json(loop_config["starts_uri"]) if a.get("fit") == fit_id]
    summary = {
        "task": task,
        "steps": int(metrics.get("step", 0)),
        "final_loss": metrics.get("loss"),
        "resumed_from": int(metrics.get("resumed_from", 0)),
        "checkpoint": latest_checkpoint_uri(cfg, task),  # what generate will load
        "seconds": round(time.time() - t0, 2),
        "num_workers": loop.num_workers,
        "use_gpu": use_gpu,
        "restarts": len(attempts) - 1,  # worker groups Ray Train restarted after a lost worker or node
        "nodes": attempts[-1]["nodes"] if attempts else [],
        "samples": n_samples,
    }
    summary |= {k: metrics[k] for k in ("rec", "kl", "psnr") if k in metrics}
    print(f"train ({task}): {summary}")
    return summary


def _worker(config: dict) -> None:
    from pipeline.train.loop import ray_worker

    ray_worker(config)
