"""Building the training state and one DDPM training step: plain PyTorch, no Ray.

A GPU benchmark or a debugging session can call `build_train_state` and `train_step` directly;
the Ray Train worker in `loop.py` only adds data sharding, DDP and reporting around them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from pipeline import diffusion
from pipeline.diffusion.objectives import is_flow as diffusion_is_flow
from pipeline.models.denoiser import build_denoiser_for, predict
from pipeline.train.sharding import full_tree, is_sharded, shard_like, shard_model_state, shard_optimizer_state


@dataclass
class DenoisingObjective:
    """What the denoiser's step needs besides the model and the batch."""

    noise_scheduler: object
    """The DDPMScheduler whose add_noise gives q(x_t | x_0) (None for flow, whose x_t is a closed form)."""
    null_emb: torch.Tensor
    """T5 embedding of the empty caption [L, D], the unconditional input for guidance dropout."""
    null_mask: torch.Tensor


@dataclass
class TrainState:
    """Everything a training loop carries between steps, for every task (pipeline.train.tasks)."""

    model: torch.nn.Module
    """The trained module (possibly DDP-wrapped, or sharded in place by FSDP2: pipeline.train.sharding)."""
    ema: object | None
    """diffusers EMAModel over the model's parameters (None: no EMA)."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    generator: torch.Generator
    """CPU generator for timesteps, noise and caption dropout, re-seeded from (seed, rank, step) at
    every step: a resumed run draws exactly what the uninterrupted one would, for any world size."""
    seed: int
    rank: int
    objective: object = None
    """What the task's step needs besides the model (the denoiser's DenoisingObjective); None when the
    model computes its whole loss itself (the autoencoder's VAEWithLoss)."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Batches of the current epoch already consumed (the data position)."""
    nonfinite_skipped: int = 0
    """Updates skipped so far because the loss or the gradient was NaN/Inf (see apply_update)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def build_train_state(cfg, manifest: dict, null_emb, null_mask, *, rank: int = 0, wrap=None) -> TrainState:
    """cfg: Config. `wrap` turns the bare model into the trained one (DDP via Ray's prepare_model, or
    pipeline.train.sharding.shard_model)."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    model = build_denoiser_for(cfg, manifest)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.train.compile:
        model.compile()  # in place: parameters and state_dict keys unchanged, so checkpoints and EMA are too
    if wrap is not None:
        model = wrap(model)
    device = next(model.parameters()).device
    # Over the wrapped model's parameters: on its device, and sharded like them under FSDP.
    ema = EMAModel(unwrap(model).parameters(), decay=cfg.train.ema_decay)
    # The fused CUDA kernel does the whole update in a few launches; the CPU keeps the reference loop.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=device.type == "cuda")
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.train.warmup_steps)
    return TrainState(
        model=model,
        ema=ema,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        generator=torch.Generator(),
        seed=cfg.run.seed,
        rank=rank,
        objective=DenoisingObjective(
            noise_scheduler=None if diffusion_is_flow(cfg.schedule) else diffusion.make_scheduler("ddpm", cfg.schedule),
            null_emb=torch.as_tensor(null_emb, dtype=torch.float32),
            null_mask=torch.as_tensor(null_mask, dtype=torch.int64),
        ),
    )


def step_seed(seed: int, rank: int, step: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def train_step(state: TrainState, batch: dict, cfg, *, autocast_dtype=None) -> dict:
    """One optimizer step on the configured objective (schedule.prediction: epsilon, v, x0 or flow;
    pipeline.diffusion.objectives), with train.loss_weighting and train.noise_offset.

    batch: latent [B,C,h,w], text_emb [B,L,D], text_mask [B,L]. Returns per-sample losses with each
    sample's noise-level quartile (for the loss-by-quartile curve) and the gradient norm.
    """
    obj: DenoisingObjective = state.objective
    schedule = cfg.schedule
    device = next(state.model.parameters()).device
    g = state.generator.manual_seed(step_seed(state.seed, state.rank, state.step))
    x0 = batch["latent"].float()
    emb = batch["text_emb"].float()
    mask = batch["text_mask"].long()
    b = x0.shape[0]
    # Classifier-free guidance: train the unconditional model on the same network by swapping in
    # the empty caption's embedding with probability cond_dropout.
    drop = torch.rand(b, generator=g) < cfg.train.cond_dropout
    emb = torch.where(drop[:, None, None], obj.null_emb.expand_as(emb), emb)
    mask = torch.where(drop[:, None], obj.null_mask.expand_as(mask), mask)
    noise = torch.randn(x0.shape, generator=g)
    level = diffusion.draw_noise_levels(schedule, b, g)  # timestep t, or flow's sigma
    if cfg.train.noise_offset:  # offset noise: a per-sample, per-channel shift the model must also remove
        noise = noise + cfg.train.noise_offset * torch.randn((b, x0.shape[1], *([1] * (x0.ndim - 2))), generator=g)
    x_t = diffusion.noisy_input(schedule, obj.noise_scheduler, x0, noise, level)
    want = diffusion.target(schedule, obj.noise_scheduler, x0, noise, level)
    weights = diffusion.loss_weights(schedule, obj.noise_scheduler, level, cfg.train.loss_weighting, cfg.train.snr_gamma)
    t_in = diffusion.model_time(schedule, level)

    x_t, t_dev, emb, mask, want = (v.to(device) for v in (x_t, t_in, emb, mask, want))
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = predict(state.model, x_t, t_dev, emb, mask)
    per_sample = diffusion.diffusion_loss(pred, want, reduction="none")
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    loss = per_sample.mean()

    grad_norm, applied = apply_update(state, loss, cfg.train.grad_clip)
    quartile = (level * 4).long() if diffusion_is_flow(schedule) else level * 4 // schedule.num_train_timesteps
    return {"loss": loss.item(), "per_sample": per_sample.detach().cpu(), "quartile": quartile.clamp(0, 3),
            "grad_norm": grad_norm, "n": b, "applied": applied}


def apply_update(state: TrainState, loss: torch.Tensor, grad_clip: float) -> tuple[float, bool]:
    """Backward, clip, and (only if the loss and the gradient are finite) step the optimizer, the LR
    schedule and the EMA and count the step. A non-finite update is skipped, never applied: it would
    poison the weights and every later checkpoint. Under DDP the gradients are already all-reduced,
    and the decision is all-reduced too, so every rank skips the same steps.
    Returns (gradient norm before clipping, applied)."""
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    finite = torch.isfinite(grad_norm.detach()) & torch.isfinite(loss.detach())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = finite.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = flag.bool()
    if not bool(finite):
        state.optimizer.zero_grad(set_to_none=True)
        state.nonfinite_skipped += 1
        return float(grad_norm), False
    state.optimizer.step()
    state.lr_scheduler.step()
    if state.ema is not None:
        state.ema.step(unwrap(state.model).parameters())
    state.step += 1
    return float(grad_norm), True


def state_dict(state: TrainState) -> dict:
    """The whole training state with whole tensors: under FSDP a collective (call it on every rank)."""
    from pipeline.checkpoint import rng_state

    return {
        "model": full_tree(unwrap(state.model).state_dict()),
        "ema": full_tree(state.ema.state_dict()) if state.ema is not None else None,
        "optimizer": full_tree(state.optimizer.state_dict()),
        "lr_scheduler": state.lr_scheduler.state_dict(),
        "rng": rng_state(),
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "nonfinite_skipped": state.nonfinite_skipped,
    }


def load_state_dict(state: TrainState, sd: dict) -> None:
    from pipeline.checkpoint import set_rng_state

    model = unwrap(state.model)
    sharded = is_sharded(model)  # a checkpoint holds whole tensors (whatever wrote it); FSDP keeps pieces
    model.load_state_dict(shard_model_state(model, sd["model"]) if sharded else sd["model"])
    if state.ema is not None:
        state.ema.load_state_dict(sd["ema"])
        if sharded:
            state.ema.shadow_params = [shard_like(v, p) for v, p in zip(state.ema.shadow_params, model.parameters())]
    state.optimizer.load_state_dict(shard_optimizer_state(state.optimizer, sd["optimizer"]) if sharded
                                    else sd["optimizer"])
    state.lr_scheduler.load_state_dict(sd["lr_scheduler"])
    set_rng_state(sd["rng"])
    state.step, state.epoch, state.batch_in_epoch = sd["step"], sd["epoch"], sd["batch_in_epoch"]
    state.nonfinite_skipped = sd.get("nonfinite_skipped", 0)
