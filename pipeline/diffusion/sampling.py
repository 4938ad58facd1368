r"""Sampling (DDPM ancestral, DDIM, DPM-Solver++) and classifier-free guidance over diffusers'
schedulers. No Ray, no I/O, no model: a network enters only as ``eps_fn(x_t, t) -> eps``.

Ancestral sampling (Ho et al. Algorithm 2; ``DDPMScheduler`` with ``variance_type="fixed_small"``)::

    x_{T-1} ~ N(0, I);   x_{t-1} = mu_theta(x_t, t) + sqrt(beta~_t) z,   z ~ N(0, I), no noise at t = 0

With fewer steps than T the chain is respaced (improved-diffusion's "respacing"): for
consecutive sampled timesteps t > t', alpha is replaced by abar_t / abar_t' in the formulas
of pipeline.diffusion.schedule, which is exactly what ``DDPMScheduler.step`` does after ``set_timesteps(steps)``.
``"ddim"`` is DDIM (Song et al. 2021) with eta = 0 (deterministic); ``"dpm"`` is
DPM-Solver++(2M) (Lu et al. 2022), both driven by the same eps predictor.

Classifier-free guidance (Ho & Salimans 2022)::

    eps = eps_uncond + s * (eps_cond - eps_uncond)

Sampling seeds: with a sequence of seeds, sample i draws its initial noise and every
per-step noise from its own ``torch.Generator`` seeded with ``seed[i]``, so a sample is
reproducible on its own regardless of batch composition. Generators live on the CPU so a
seed gives the same noise on every device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.config import ScheduleSection
from pipeline.diffusion.schedule import SAMPLERS, check_sampler, checked, make_scheduler


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond) (scale 1 = conditional). Linear, so the
    same for every prediction type (eps, v, x_0, flow velocity)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def nfe_per_image(sampler: str, steps: int, guidance_scale: float = 1.0) -> int:
    """Network evaluations per image: one per step (every sampler here), doubled under guidance (scale != 1)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    return int(steps) * (2 if guidance_scale != 1 else 1)


def _generators(seed: int | Sequence[int], batch: int) -> torch.Generator | list[torch.Generator]:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return torch.Generator("cpu").manual_seed(int(seed))
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence | np.ndarray | torch.Tensor):
        raise TypeError(f"seed must be an int or a sequence of ints, got {type(seed).__name__}")
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}; need one seed per sample")
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@torch.no_grad()
def sample(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    *,
    sampler: str = "ddpm",
    steps: int = 1000,
    seed: int | Sequence[int] = 0,
    schedule: ScheduleSection | None = None,
    prediction: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], Any] | None = None,
) -> torch.Tensor:
    """Draw x_0 of ``shape`` = [B, ...] by running ``sampler`` for ``steps`` steps from pure noise N(0, I).

    ``fn(x_t, t)`` returns the network's prediction for x_t ([B, ...], ``dtype``, on ``device``): what
    ``prediction`` names (default ``schedule.prediction``; the schedule defaults to the config's, DDPM's
    linear one). ``t`` is [B], all equal: the integer timestep (LongTensor) for epsilon, v and x0; for
    flow the float T * sigma, sigma the noise level of x_t = (1 - sigma) x_0 + sigma eps (diffusers'
    convention; see pipeline.diffusion.objectives). Guidance, conditioning and autocast are ``fn``'s
    business (see :func:`guided_eps`). ``seed``: an int seeds one generator for the whole batch
    (reproducible as a batch); a sequence of B ints gives sample i its own generator for its initial
    noise and every per-step noise (reproducible per sample, whatever else is in the batch).
    ``progress(i, steps)`` is called after step i (1-based). Runs under ``torch.no_grad``.
    """
    schedule = checked(schedule)
    if prediction is not None and prediction != schedule.prediction:
        schedule = dataclasses.replace(schedule, prediction=prediction)
        schedule = checked(schedule)
    check_sampler(sampler, schedule.prediction)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"shape must be [batch, ...] with batch >= 1, got {shape}")
    steps = int(steps)
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{schedule.num_train_timesteps}, got {steps}")
    from diffusers.utils.torch_utils import randn_tensor

    device = torch.device(device)
    batch = shape[0]
    flow = schedule.prediction == "flow"

    scheduler = make_scheduler(sampler, schedule)
    scheduler.set_timesteps(steps, device=device)
    generator = _generators(seed, batch)

    x = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    timesteps = scheduler.timesteps
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if flow:  # the exact noise level of x (DPM-Solver's flow timesteps are rounded to integers)
            t_batch = torch.full((batch,), float(scheduler.sigmas[i]) * schedule.num_train_timesteps, device=device)
            x_in = x
        else:
            t_batch = torch.full((batch,), int(t), dtype=torch.long, device=device)
            x_in = scheduler.scale_model_input(x, t)
        out = fn(x_in, t_batch)
        if out.shape != x.shape:
            raise ValueError(f"fn returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        # Only DDPM draws noise here (DDIM runs at eta = 0, DPM-Solver++ and Euler are ODE solvers);
        # passing the generator to all keeps any stochastic variant seeded the same way.
        x = scheduler.step(out.to(x.dtype), t, x, generator=generator).prev_sample.to(dtype)
        if progress is not None:
            progress(i + 1, total)
    return x
