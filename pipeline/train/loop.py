"""The training loop, top to bottom: restore, step, report. Callable with or without Ray.

`run_loop` knows nothing of Ray: it takes a function giving each epoch's batches and a `report`
callback. `ray_worker` (the Ray Train per-worker function) plugs in the worker's dataset shard,
DDP and `ray.train.report`; `train_locally` plugs in an in-memory dataset and a local folder, for
tests, debugging and GPU benchmarks on machines without Ray.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Callable, Iterable

import numpy as np
import torch

from pipeline.train import data as train_data
from pipeline.train import sharding, tasks
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.step import TrainState, build_train_state, load_state_dict, state_dict, train_step

log = logging.getLogger(__name__)

ReportFn = Callable[[dict, "TrainState | None"], None]


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient (loop.max_nonfinite_steps)."""


class MetricWindow:
    """Averages between reports: loss, grad norm, a step's extra scalars, and for the denoiser the loss
    by timestep quartile (as improved-diffusion logs it)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.q_sum = torch.zeros(4, dtype=torch.float64)
        self.q_n = torch.zeros(4, dtype=torch.float64)
        self.samples = 0
        self.grad_norms: list[float] = []
        self.scalars: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()

    def add(self, out: dict) -> None:
        self.losses.append(out["loss"])
        if "quartile" in out:  # the denoiser's per-sample losses by timestep quartile
            q = out["quartile"]
            self.q_sum.index_add_(0, q, out["per_sample"].double())
            self.q_n.index_add_(0, q, torch.ones_like(q, dtype=torch.float64))
        for k, v in out.get("scalars", {}).items():
            self.scalars.setdefault(k, []).append(v)
        self.samples += out["n"]
        self.grad_norms.append(out["grad_norm"])

    def flush(self, state: TrainState, world_size: int) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        m = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": sum(self.losses) / max(len(self.losses), 1),
            "lr": state.lr_scheduler.get_last_lr()[0],
            "grad_norm": sum(self.grad_norms) / max(len(self.grad_norms), 1),
            "samples_per_s": self.samples * world_size / dt,
            "nonfinite_skipped": state.nonfinite_skipped,
        }
        for i in range(4):
            if self.q_n[i] > 0:
                m[f"loss_q{i}"] = float(self.q_sum[i] / self.q_n[i])
        for k, v in self.scalars.items():
            m[k] = sum(v) / len(v)
        self.reset()
        return m


def run_loop(
    cfg,
    state: TrainState,
    batches_for_epoch: Callable[[int], Iterable[dict]],
    report: ReportFn,
    *,
    step_fn=train_step,
    loop=None,
    world_size: int = 1,
    autocast_dtype=None,
    on_batch: Callable[[TrainState, dict], None] | None = None,
) -> None:
    """Train until loop.steps (`loop`: a LoopSection, default cfg.train). Reports every `report_every`
    steps, checkpoints every `checkpoint_every` and at the end. The data position (epoch, batches
    consumed) is part of the state, so a resumed run skips exactly the batches it already trained on.
    `on_batch(state, batch)` is called after each batch is consumed (its update applied or skipped),
    before any report of that step."""
    loop = loop or cfg.train
    window = MetricWindow()
    total = loop.steps
    resumed_from = state.step
    max_nonfinite = loop.max_nonfinite_steps
    in_a_row = 0
    if state.step >= total:  # nothing left to do: say so, so the caller still sees where training stands
        report({"step": state.step, "epoch": state.epoch, "resumed_from": resumed_from, "loss": float("nan")}, None)
        return
    while state.step < total:
        seen = 0
        for i, batch in enumerate(batches_for_epoch(state.epoch)):
            seen += 1
            if i < state.batch_in_epoch:
                continue  # consumed before the checkpoint we resumed from
            out = step_fn(state, batch, cfg, autocast_dtype=autocast_dtype)
            state.batch_in_epoch = i + 1
            if on_batch is not None:
                on_batch(state, batch)
            if not out.get("applied", True):
                in_a_row += 1
                log.warning("step %d: non-finite loss %s or gradient norm %s: update skipped (%d in a row, %d in all)",
                            state.step + 1, out["loss"], out["grad_norm"], in_a_row, state.nonfinite_skipped)
                if in_a_row >= max_nonfinite:
                    raise NonFiniteTraining(
                        f"{in_a_row} consecutive steps had a non-finite loss or gradient (limit: max_nonfinite_steps="
                        f"{max_nonfinite}) at step {state.step}, epoch {state.epoch}, batch {i}; no update was applied "
                        "and no checkpoint holds them. Lower the learning rate, check the data for NaN/Inf, or resume."
                    )
                continue
            in_a_row = 0
            window.add(out)
            last = state.step >= total
            checkpoint = last or state.step % loop.checkpoint_every == 0
            if checkpoint or state.step % loop.report_every == 0:
                metrics = window.flush(state, world_size) | {"resumed_from": resumed_from}
                report(metrics, state if checkpoint else None)
            if last:
                return
        if seen == 0:
            raise RuntimeError(
                "the training data yields no full batch: lower train.batch_size or encode more data"
            )
        state.epoch += 1
        state.batch_in_epoch = 0


def checkpoint_info(cfg, state: TrainState, data_identity: dict | None = None) -> dict:
    """The checkpoint manifest's fields beside the file list; `data_identity` names the data trained on
    (e.g. the latents URI, keyed by the VAE's weights) so a resume on other data can be refused."""
    return {"step": state.step, "epoch": state.epoch, "config": cfg.to_dict(), "data_identity": data_identity or {}}


def format_metrics(m: dict, total: int) -> str:
    if "lr" not in m:
        return f"step {m['step']}/{total}: nothing left to train"
    q = " ".join(f"q{i}={m[f'loss_q{i}']:.3f}" for i in range(4) if f"loss_q{i}" in m)
    extra = " ".join(f"{k} {m[k]:.4g}" for k in ("rec", "kl", "psnr") if k in m)
    return (
        f"step {m['step']}/{total} loss {m['loss']:.4f} " + (f"({q}) " if q else "") + (f"{extra} " if extra else "")
        + f"lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} samples/s {m['samples_per_s']:.1f}"
    )


def ray_worker(config: dict) -> None:
    """Ray Train's per-worker function: restore, train, report."""
    import ray.train
    import ray.train.torch

    from pipeline.config import from_dict

    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    task = tasks.get(config["task"])
    loop = task.loop(cfg)
    sharded = getattr(loop, "parallel", "ddp") == "fsdp"  # the denoiser's train.parallel
    wrap = (lambda m: sharding.shard_model(m, device)) if sharded else ray.train.torch.prepare_model
    state = task.build_state(cfg, config["prepared"], rank=rank, wrap=wrap)
    # One rule for what to resume from, here and in generate: the newest stored checkpoint that verifies
    # (checkpoint_store), not Ray Train's registry. Rank 0 chooses; every rank loads that folder.
    from pipeline import checkpoint_store

    found = checkpoint_store.load_newest_trusted(config["run_uri"], map_location=device) if rank == 0 else None
    folder, sd = (found[0], found[1]) if found else (None, None)
    folder = _agree(folder, rank, world, device)
    if folder and sd is None:
        with tempfile.TemporaryDirectory() as tmp:
            sd, _ = checkpoint_store.fetch(folder, tmp, map_location=device)
    if folder:
        load_state_dict(state, sd)
        if rank == 0:
            log.info("resumed from %s: step %d (epoch %d, batch %d)", folder, state.step, state.epoch, state.batch_in_epoch)

    # Metric history for the report's curves: rank 0 rewrites one small JSON per report; on resume the
    # entries past the restored step (written after the checkpoint we resumed from) are dropped.
    from pipeline import storage

    history_uri = config.get("history_uri")
    history: list[dict] = []
    if rank == 0 and history_uri and storage.exists(history_uri):
        history = [m for m in storage.read_json(history_uri) if m.get("step", 0) <= state.step]

    # The data: the whole (key-ordered) table the driver put in the object store; which rows each step
    # takes is a function of (seed, epoch, rank) alone (pipeline.train.data), not of Ray's scheduling.
    arrays = ray.get(config["data_ref"])
    node = ray.util.get_node_ip_address()
    attempt = _agree(train_data.new_attempt_id() if rank == 0 else None, rank, world, device)
    if rank == 0:  # the run's attempts, in order: what the sample audit and fit's summary read back
        starts = storage.read_json(config["starts_uri"]) if storage.exists(config["starts_uri"]) else []
        starts.append({"attempt": attempt, "fit": config["fit_id"], "resumed_from": state.step, "epoch": state.epoch,
                       "batch_in_epoch": state.batch_in_epoch, "world": world, "nodes": _gather(node, world),
                       "time": time.time()})
        storage.write_json(config["starts_uri"], starts)
    elif world > 1:
        _gather(node, world)
    samples = train_data.SampleLog(config["samples_uri"], attempt, rank, world, node)

    def batches(epoch: int):
        for b in train_data.iter_rank_batches(arrays, cfg.run.seed, epoch, loop.batch_size, rank, world):
            yield {k: (v if k in ("key", "_batch") else torch.from_numpy(v)) for k, v in b.items()}

    def on_batch(st: TrainState, batch: dict) -> None:
        samples.add(st.step, st.epoch, batch["_batch"], batch["key"])

    last: dict = {}

    def report(metrics: dict, ckpt_state: TrainState | None) -> None:
        last.clear()
        last.update(metrics)
        if rank == 0:
            print(format_metrics(metrics, loop.steps), flush=True)
            if history_uri and "lr" in metrics:
                history.append(metrics | {"attempt": attempt})  # which worker group trained this step
                storage.write_json(history_uri, history)
        if ckpt_state is None:
            ray.train.report(metrics)
            return
        samples.write(ckpt_state.step)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's record is stored before rank 0 commits the checkpoint
        # Under FSDP every rank takes part in gathering the whole tensors; under DDP rank 0 has them all.
        sd = state_dict(ckpt_state) if rank == 0 or sharded else None
        if rank == 0:  # our upload (manifest last) and retention; Ray Train is told metrics only
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, sd, checkpoint_info(cfg, ckpt_state, config.get("data_identity")))
                checkpoint_store.save_to_storage(tmp, config["run_uri"], ckpt_state.step, loop.num_to_keep)
        ray.train.report(metrics)

    autocast = torch.bfloat16 if device.type == "cuda" and loop.mixed_precision == "bf16" else None
    if device.type == "cuda":  # TF32 for what autocast leaves in float32 (the optimizer, the loss)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run_loop(cfg, state, batches, report, step_fn=task.step, loop=loop, world_size=world, autocast_dtype=autocast,
             on_batch=on_batch)
    # What fit() returns (Ray Train's Result carries metrics only with a checkpoint); an attempt that
    # found nothing left to train (its predecessor died after finishing) keeps that one's summary.
    if rank == 0 and ("lr" in last or not storage.exists(config["result_uri"])):
        storage.write_json(config["result_uri"], last)


def _agree(text: str | None, rank: int, world: int, device) -> str | None:
    """Rank 0's string (a checkpoint folder, an attempt id), on every rank (bytes over the process group)."""
    if world < 2 or not torch.distributed.is_initialized():
        return text
    size = 512
    buf = torch.zeros(size, dtype=torch.uint8, device=device)
    if rank == 0 and text:
        raw = text.encode()
        if len(raw) > size:
            raise ValueError(f"longer than {size} bytes: {text}")
        buf[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    torch.distributed.broadcast(buf, src=0)
    raw = bytes(buf.cpu().tolist()).rstrip(b"\0")
    return raw.decode() or None


def _gather(value: str, world: int) -> list[str]:
    """Every rank's `value`, in rank order (on every rank)."""
    if world < 2 or not torch.distributed.is_initialized():
        return [value]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def train_locally(cfg, manifest: dict, null_emb, null_mask, data: dict, out_dir: str, *, device="cpu") -> list[dict]:
    """Train without Ray on in-memory tensors (latent, text_emb, text_mask; optional "key"), resuming
    from the latest complete checkpoint in `out_dir`. Batches come in the order Ray Train's ranks use
    (pipeline.train.data, one rank).
    Returns the reported metrics."""
    state = build_train_state(cfg, manifest, null_emb, null_mask, wrap=lambda m: m.to(device))
    latest = latest_local_checkpoint(out_dir)
    if latest:
        sd, _ = load_checkpoint(latest)
        load_state_dict(state, sd)
    tensors = data
    table = {"key": np.asarray(tensors.get("key", [f"{i:08d}" for i in range(len(tensors["latent"]))]))}
    table["row"] = np.arange(len(table["key"]))
    table = train_data.sort_by_key(table)

    def batches(epoch: int):
        for b in train_data.iter_rank_batches(table, cfg.run.seed, epoch, cfg.train.batch_size, 0, 1):
            idx = torch.from_numpy(b["row"])
            yield {k: v[idx] for k, v in tensors.items() if k != "key"}

    reports: list[dict] = []

    def report(metrics: dict, ckpt_state: TrainState | None) -> None:
        reports.append(metrics)
        log.info(format_metrics(metrics, cfg.train.steps))
        if ckpt_state is not None:
            save_checkpoint(
                os.path.join(out_dir, f"checkpoint_{ckpt_state.step:08d}"), state_dict(ckpt_state), checkpoint_info(cfg, ckpt_state)
            )

    run_loop(cfg, state, batches, report)
    return reports


def latest_local_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint folder under out_dir (incomplete ones are ignored)."""
    from pipeline.checkpoint import IncompleteCheckpoint, read_manifest

    if not os.path.isdir(out_dir):
        return None
    for name in sorted(os.listdir(out_dir), reverse=True):
        folder = os.path.join(out_dir, name)
        if name.startswith("checkpoint_"):
            try:
                read_manifest(folder)
                return folder
            except IncompleteCheckpoint as e:
                log.error("CHECKPOINT NOT TRUSTED, falling back to an older one: %s", e)
    return None
