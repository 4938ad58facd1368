"""Launching a task's training (pipeline.train.tasks) on Ray Train: TorchTrainer, DDP, checkpoints in
object storage.

Checkpoints live at `<storage>/checkpoints/<run.name>/` (the autoencoder's at `<run.name>-vae/`), written and pruned by rank 0 through
`checkpoint_store` (Ray Train is told metrics only). Calling `fit` again with the same run name
makes the workers resume from the newest checkpoint there that verifies, and the loop continues
from its step, epoch and batch position up to the (possibly raised) `train.steps`.
"""

from __future__ import annotations

import logging
import time
import uuid

from pipeline import checkpoint_store, paths, storage
from pipeline.devices import resolve_use_gpu
from pipeline.signals import keep_python_sigint_handler
from pipeline.train import tasks

log = logging.getLogger(__name__)


def run_uri(cfg, task: str = "denoiser") -> str:
    """Where this run's checkpoint folders of `task` live (Ray Train's experiment folder)."""
    return tasks.get(task).run_uri(cfg)


def starts_uri(cfg, task: str = "denoiser") -> str:
    """JSON list of the run's worker-group starts: attempt id, fit, step and data position resumed from, nodes."""
    return storage.join(paths.outputs(cfg), f"{task}_starts.json")


def samples_uri(cfg, task: str = "denoiser") -> str:
    """Where each rank records the sample keys of every batch it trained on (pipeline.train.data.SampleLog)."""
    return storage.join(paths.outputs(cfg), "samples", task)


def audit_samples(cfg, task: str = "denoiser") -> dict:
    """Per epoch: samples trained on, missing, repeated, out of order (pipeline.train.data.audit)."""
    from pipeline.train import data

    t = tasks.get(task)
    keys = data.sort_by_key(t.table(cfg, t.prepare(cfg)))["key"]
    return data.audit(samples_uri(cfg, task), storage.read_json(starts_uri(cfg, task)), keys, cfg.run.seed,
                      t.loop(cfg).batch_size)


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
    (Task.resume_sections and resume_keys, and the data it names, e.g. the latent dataset, which a
    retrained VAE changes) that differ from now: fit would otherwise resume it."""
    from pipeline.config import ConfigError, from_dict

    t = tasks.get(task)
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
    conflicts = t.resume_conflicts(saved, cfg.to_dict())
    old_data = info.get("data_identity") or {}
    now = t.data_identity(cfg) if data_identity is None else data_identity
    conflicts += [f"{k}: checkpoint {old_data[k]!r}, now {v!r}" for k, v in now.items()
                  if k in old_data and old_data[k] != v]
    if conflicts:
        raise ConfigError(
            f"run {run_uri(cfg, task).rsplit('/', 1)[-1]!r} has a checkpoint ({latest}) trained with other settings, "
            f"which training would resume: {'; '.join(conflicts)}. Use a new run.name, or the checkpoint's settings."
        )


def fit(cfg, task: str = "denoiser") -> dict:
    """Train a task (pipeline.train.tasks: "denoiser" on the latent dataset, "vae" on decoded images)
    with the same loop, checkpoints and resume."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train import dist

    t = tasks.get(task)
    data_identity = t.data_identity(cfg)  # once: what the resume check compares is what checkpoints record
    check_resumable(cfg, task, data_identity)
    checkpoint_store.remove_incomplete(run_uri(cfg, task))
    outputs = paths.outputs(cfg)
    fit_id = uuid.uuid4().hex[:12]
    loop = t.loop(cfg)
    prepared = t.prepare(cfg)
    if prepared.get("note"):
        print(f"train: NOTE {prepared['note']}")
    loop_config: dict = {"cfg": cfg.to_dict(), "task": task, "prepared": prepared,
                         "data_identity": data_identity, "run_uri": run_uri(cfg, task), "fit_id": fit_id,
                         "history_uri": storage.join(outputs, f"{task}_metrics.json"),
                         "result_uri": storage.join(outputs, f"{task}_result.json"),
                         "starts_uri": starts_uri(cfg, task),
                         "samples_uri": samples_uri(cfg, task)}
    # Read once here, in key order (pipeline.train.data), and shared through the object store (owned by
    # this driver, so it outlives any worker or node the run loses); each rank picks its rows by
    # (seed, epoch, rank).
    from pipeline.train import data

    table = data.sort_by_key(t.table(cfg, prepared))
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
            name=run_uri(cfg, task).rsplit("/", 1)[-1],
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
        "parallel": getattr(loop, "parallel", "ddp"),  # the autoencoder always trains under DDP
        "use_gpu": use_gpu,
        "restarts": len(attempts) - 1,  # worker groups Ray Train restarted after a lost worker or node
        "nodes": attempts[-1]["nodes"] if attempts else [],
        "samples": n_samples,
    }
    summary |= {k: metrics[k] for k in t.summary_keys if k in metrics}
    print(f"train ({task}): {summary}")
    return summary


def _worker(config: dict) -> None:
    from pipeline.train.loop import ray_worker

    ray_worker(config)
