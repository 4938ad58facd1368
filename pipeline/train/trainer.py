"""Launching the denoiser's training on Ray Train (TorchTrainer, DDP, checkpoints in object storage).

Checkpoints live at `<storage>/checkpoints/<run.name>/`, written and pruned by rank 0 through
`checkpoint_store` (Ray Train is told metrics only). Calling `fit` again with the same run name
makes the workers resume from the newest checkpoint there that verifies, and the loop continues
from its step, epoch and batch position up to the (possibly raised) `train.steps`.
"""

from __future__ import annotations

import logging
import time

from pipeline import storage
from pipeline.signals import keep_python_sigint_handler
from pipeline.train import checkpoint_store
from pipeline.config import resolve_use_gpu
from pipeline.data.encode import committed_files, load_manifest, load_null_text

log = logging.getLogger(__name__)


def run_name(cfg, task: str = "denoiser") -> str:
    return f"{cfg.run.name}-vae" if task == "vae" else cfg.run.name


def run_uri(cfg, task: str = "denoiser") -> str:
    """Where this run's checkpoint folders live (Ray Train's experiment folder)."""
    return storage.join(cfg.checkpoints_uri(), run_name(cfg, task))


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

    from pipeline.train import dist

    data_identity = {"latents_uri": cfg.latents_uri()} if task == "denoiser" else {}
    check_resumable(cfg, task, data_identity)
    checkpoint_store.remove_incomplete(run_uri(cfg, task))
    loop_config: dict = {"cfg": cfg.to_dict(), "task": task, "data_identity": data_identity,
                         "run_uri": run_uri(cfg, task),
                         "history_uri": storage.join(cfg.outputs_uri(), f"{task}_metrics.json"),
                         "result_uri": storage.join(cfg.outputs_uri(), f"{task}_result.json")}
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
        files = [storage.ray_path(f) for f in committed_files(latents, "train")]
        dataset = ray.data.read_parquet(files).select_columns(
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
    storage.rm(loop_config["result_uri"])  # written by rank 0 at the end of this fit, never an earlier one's
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=loop.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name(cfg, task),
            storage_path=storage.ray_path(cfg.checkpoints_uri()),
        ),
        datasets={"train": dataset},
        torch_config=dist.torch_config(),  # on a loopback cluster the store binds 127.0.0.1 only
    )
    t0 = time.time()
    # fit() installs Ray Train's SIGINT handler and leaves it in place: without this, Ctrl-C during a
    # later stage of this driver (e.g. generation) would do nothing, and during fit() would exit silently.
    with keep_python_sigint_handler():
        trainer.fit()
    metrics = storage.read_json(loop_config["result_uri"])  # rank 0's last report of this fit
    summary = {
        "task": task,
        "steps": int(metrics.get("step", 0)),
        "final_loss": metrics.get("loss"),
        "resumed_from": int(metrics.get("resumed_from", 0)),
        "checkpoint": latest_checkpoint_uri(cfg, task),  # what generate will load
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
