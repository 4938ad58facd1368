"""Launching the denoiser's training on Ray Train (TorchTrainer, DDP, checkpoints in object storage).

Checkpoints live at `<storage>/checkpoints/<run.name>/`. Ray Train V2 keeps a snapshot of the
checkpoints it registered there, so calling `fit` again with the same run name hands the latest
complete checkpoint to the workers (`ray.train.get_checkpoint()`), and the loop continues from its
step, epoch and batch position up to the (possibly raised) `train.steps`.
"""

from __future__ import annotations

import logging
import time

from pipeline import storage
from pipeline.config import resolve_use_gpu
from pipeline.data.encode import load_manifest, load_null_text

log = logging.getLogger(__name__)


def run_name(cfg, task: str = "denoiser") -> str:
    return f"{cfg.run.name}-vae" if task == "vae" else cfg.run.name


def complete_checkpoints(cfg, task: str = "denoiser") -> list[tuple[int, str]]:
    """(step, folder) of this run's complete checkpoints in storage, oldest first. A folder without its
    manifest (written last) or whose files' sizes differ from it never finished: it is not listed."""
    run_uri = storage.join(cfg.checkpoints_uri(), run_name(cfg, task))
    folders = [u for u in storage.ls(run_uri) if u.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")]
    found = []
    for folder in folders:
        manifest_uri = storage.join(folder, "manifest.json")
        if not storage.exists(manifest_uri):
            continue  # never completed: not trusted
        manifest = storage.read_json(manifest_uri)
        if all(storage.size(storage.join(folder, name)) == size for name, size in manifest["files"].items()):
            found.append((manifest["step"], folder))
    return sorted(found)


def latest_checkpoint_uri(cfg, task: str = "denoiser") -> str | None:
    """The newest complete checkpoint folder of this run in storage, or None."""
    found = complete_checkpoints(cfg, task)
    return found[-1][1] if found else None


def check_resumable(cfg, task: str = "denoiser", data_identity: dict | None = None) -> None:
    """Raise ConfigError if this run's latest checkpoint was trained under settings its weights depend on
    (noise schedule, architectures, encoders, and for the denoiser the latent dataset, which a retrained
    VAE changes) that differ from now: fit would otherwise resume it."""
    from pipeline.config import ConfigError, from_dict
    from pipeline.train.checkpoint import resume_conflicts

    latest = latest_checkpoint_uri(cfg, task)
    if latest is None:
        return
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
    """Decoded training images (column `image`, uint8 S x S x 3) for the autoencoder, decoded once."""
    from pipeline.data.encode import decode_batch, read_raw

    raw, _ = read_raw(cfg, split)
    decoded = raw.map_batches(decode_batch, fn_kwargs={"image_size": cfg.data.image_size}, batch_size=256,
                              batch_format="numpy")
    return decoded.filter(lambda r: r["reason"] == "").select_columns(["image"]).materialize()


def fit(cfg, task: str = "denoiser") -> dict:
    """Train the denoiser (task="denoiser", on the latent dataset) or the autoencoder (task="vae", on
    decoded images) with the same loop, checkpoints and resume."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    data_identity = {"latents_uri": cfg.latents_uri()} if task == "denoiser" else {}
    check_resumable(cfg, task, data_identity)
    loop_config: dict = {"cfg": cfg.to_dict(), "task": task, "data_identity": data_identity,
                         "history_uri": storage.join(cfg.outputs_uri(), f"{task}_metrics.json")}
    if task == "vae":
        loop = cfg.vae_train
        dataset = image_dataset(cfg)
    else:
        loop = cfg.train
        latents = cfg.latents_uri()
        manifest = load_manifest(latents)
        null_emb, null_mask = load_null_text(latents)
        if manifest["untrained"]:
            print("train: NOTE training on latents of UNTRAINED encoders (see the encode manifest)")
        dataset = ray.data.read_parquet(storage.ray_path(storage.join(latents, "train"))).select_columns(
            ["latent", "text_emb", "text_mask"]
        )
        loop_config |= {"manifest": manifest, "null_emb": null_emb.tolist(), "null_mask": null_mask.tolist()}
    use_gpu = resolve_use_gpu(loop.use_gpu)
    # Ray Train gives each worker one CPU, or one GPU and no CPU. cluster_resources() is the total.
    spare_cpus = ray.cluster_resources().get("CPU", 0) - (0 if use_gpu else loop.num_workers)
    if spare_cpus < 1:
        # Ray Data streams the dataset with tasks that need a CPU of their own; with every CPU held by
        # a training worker they would never be scheduled and training would wait forever. Read it
        # into the object store first instead (the latents are small next to the images).
        log.info("%s: no CPU left beside %d workers: reading the dataset before training", task, loop.num_workers)
        dataset = dataset.materialize()
    storage.ensure_bucket(cfg.checkpoints_uri())
    storage.makedirs(cfg.checkpoints_uri())
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=loop.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name(cfg, task),
            storage_path=storage.ray_path(cfg.checkpoints_uri()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=loop.num_to_keep),
        ),
        datasets={"train": dataset},
    )
    t0 = time.time()
    result = trainer.fit()
    metrics = result.metrics or {}
    summary = {
        "task": task,
        "steps": int(metrics.get("step", 0)),
        "final_loss": metrics.get("loss"),
        "resumed_from": int(metrics.get("resumed_from", 0)),
        "checkpoint": latest_checkpoint_uri(cfg, task),
        "seconds": round(time.time() - t0, 2),
        "num_workers": loop.num_workers,
        "use_gpu": use_gpu,
    }
    summary |= {k: metrics[k] for k in ("rec", "kl", "psnr") if k in metrics}
    print(f"train ({task}): {summary}")
    return summary


def _worker(config: dict) -> None:
    from pipeline.train.loop import ray_worker

    ray_worker(config)
