r"""The noise schedule and the forward process (DDPM, Ho et al. 2020): float64 closed forms beside
diffusers' schedulers. No Ray, no I/O, no model.

The one schedule config is the config's `schedule` section (:class:`pipeline.config.ScheduleSection`):
training, sampling and the bound all read it, so they cannot disagree. Its fields are checked here
too (:func:`check_schedule`) so a hand-built section gets the config's error messages.

Notation (timesteps are 0-indexed, ``t = 0 .. T-1`` with ``T = num_train_timesteps``)::

    beta_t                                  noise schedule (ScheduleSection)
    alpha_t      = 1 - beta_t
    abar_t       = prod_{s<=t} alpha_s                   ("alphas_cumprod")
    abar_{t-1}   = abar of the previous step; abar_{-1} = 1   ("alphas_cumprod_prev")

Forward process (Ho et al. eq. 4)::

    q(x_t | x_0)       = N( sqrt(abar_t) x_0 , (1 - abar_t) I )
    x_t                = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)

Forward posterior (Ho et al. eqs. 6-7)::

    q(x_{t-1} | x_t, x_0) = N( mu~_t(x_t, x_0), beta~_t I )
    mu~_t   = sqrt(abar_{t-1}) beta_t / (1 - abar_t) * x_0          (posterior_mean_coef1)
            + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) * x_t   (posterior_mean_coef2)
    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t              (posterior_variance)

Epsilon parameterisation (Ho et al. eq. 11; substitute x_0 = (x_t - sqrt(1-abar_t) eps)/sqrt(abar_t))::

    mu_theta(x_t, t) = ( x_t - beta_t / sqrt(1 - abar_t) * eps_theta(x_t, t) ) / sqrt(alpha_t)

Training objective (Ho et al. Algorithm 1, "L_simple")::

    t ~ Uniform{0..T-1},  eps ~ N(0, I),  loss = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1-abar_t) eps, t) ||^2
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DIFFUSION_SAMPLERS, FLOW_SAMPLERS, ScheduleSection, check_schedule, samplers_for

SAMPLERS = tuple(dict.fromkeys(DIFFUSION_SAMPLERS + FLOW_SAMPLERS))  # ddpm, ddim, dpm, euler
"""Sampler names accepted by :func:`make_scheduler`, :func:`pipeline.diffusion.sampling.sample` and
:func:`pipeline.diffusion.sampling.nfe_per_image` (euler: flow only; ddpm, ddim: diffusion only)."""

TIMESTEP_SPACING = "trailing"
"""diffusers ``timestep_spacing`` of all three samplers, which matters when ``steps < T``.

"trailing" (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
Table 2) makes the first sampled timestep T-1, where the N(0, I) initial noise is the right
marginal; "leading" starts lower (e.g. t = 950 for 20 steps), which biases deterministic
samplers when abar there is not ~0 (measured: DDIM-20 on the cosine schedule, 4% mean bias).
``DDPMScheduler`` and ``DPMSolverMultistepScheduler`` read the previous timestep off their
timestep / sigma arrays, so they are exact for any ``steps``. ``DDIMScheduler`` assumes the
stride ``T // steps``; when ``steps`` does not divide T its target timestep can be one off
from the next sampled one (e.g. 933 vs 932), a negligible error next to the spacing bias.
"""


def checked(schedule: ScheduleSection | None) -> ScheduleSection:
    """`schedule` (default: the config's default) after the config's own checks of its fields."""
    schedule = schedule if schedule is not None else ScheduleSection()
    check_schedule(schedule)
    return schedule


def check_sampler(sampler: str, prediction: str = "epsilon") -> None:
    """A sampler that exists for the objective: ddpm, ddim, dpm (diffusion), euler, dpm (flow)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    allowed = samplers_for(prediction)
    if sampler not in allowed:
        raise ValueError(f"sampler {sampler!r} does not exist for prediction {prediction!r}; allowed: {', '.join(allowed)}")


def make_scheduler(sampler: str, schedule: ScheduleSection | None = None):
    """A fresh diffusers scheduler for ``sampler`` on ``schedule`` (default: the config's default `schedule`).

    Diffusion objectives (``schedule.prediction`` epsilon, v, x0): ``"ddpm"`` -> ``DDPMScheduler``
    (variance_type "fixed_small", i.e. beta~_t; its ``add_noise`` is the training-side forward process),
    ``"ddim"`` -> ``DDIMScheduler`` (eta = 0 at ``step``), ``"dpm"`` -> ``DPMSolverMultistepScheduler``
    (DPM-Solver++, order 2). They never clip or threshold x_0, share the betas of ``schedule`` and,
    with ``zero_terminal_snr``, rescale them as Lin et al. 2023 do. Flow: ``"euler"`` ->
    ``FlowMatchEulerDiscreteScheduler``, ``"dpm"`` -> DPM-Solver++ on flow sigmas, both with
    ``schedule.shift``. Schedulers are stateful: make a new one per sampling run.
    """
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    from pipeline.diffusion.objectives import DIFFUSERS_PREDICTION

    schedule = checked(schedule)
    check_sampler(sampler, schedule.prediction)
    T = schedule.num_train_timesteps
    if schedule.prediction == "flow":
        if sampler == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=schedule.shift)
        return DPMSolverMultistepScheduler(num_train_timesteps=T, use_flow_sigmas=True, flow_shift=schedule.shift,
                                           prediction_type="flow_prediction", algorithm_type="dpmsolver++",
                                           solver_order=2, thresholding=False)
    common: dict[str, Any] = dict(
        num_train_timesteps=T,
        beta_schedule=schedule.beta_schedule,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        prediction_type=DIFFUSERS_PREDICTION[schedule.prediction],
        timestep_spacing=TIMESTEP_SPACING,
    )
    if schedule.zero_terminal_snr:
        common["rescale_betas_zero_snr"] = True
    if sampler == "ddpm":
        return DDPMScheduler(**common, variance_type="fixed_small", clip_sample=False, thresholding=False)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, thresholding=False, set_alpha_to_one=True)
    # DPMSolverMultistepScheduler has no x_0 clipping option; thresholding=False is its equivalent.
    # The cosine schedule's last abar_t is ~1e-9 (log-SNR lambda ~ -10); diffusers documents clipping
    # lambda as critical for DPM-Solver on that schedule. At -5.1, sqrt(abar) ~ 0.006 where sampling
    # starts, about the linear schedule's sqrt(abar_{T-1}) = 0.0064.
    lambda_min = -5.1 if schedule.beta_schedule == "squaredcos_cap_v2" else -float("inf")
    return DPMSolverMultistepScheduler(
        **common,
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=False,
        lambda_min_clipped=lambda_min,
    )


# --------------------------------------------------------------------------- float64 closed forms


def _betas_float64(schedule: ScheduleSection) -> np.ndarray:
    betas = _base_betas_float64(schedule)
    return rescale_zero_terminal_snr(betas) if schedule.zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so its last value is 0 and its first
    unchanged; the betas that give it (the last beta is 1: x_{T-1} is pure noise)."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _base_betas_float64(schedule: ScheduleSection) -> np.ndarray:
    T = schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        return np.linspace(schedule.beta_start, schedule.beta_end, T, dtype=np.float64)
    if schedule.beta_schedule == "scaled_linear":
        return np.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, T, dtype=np.float64) ** 2
    # squaredcos_cap_v2: improved-diffusion's betas_for_alpha_bar(T, cosine, max_beta=0.999)
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)


def schedule_tables(schedule: ScheduleSection | None = None) -> dict[str, np.ndarray]:
    """float64 tables of length T, as improved-diffusion's ``GaussianDiffusion.__init__`` computes them.

    Keys: betas, alphas, alphas_cumprod, alphas_cumprod_prev (abar_{t-1}, with abar_{-1} = 1),
    posterior_variance (beta~_t), posterior_mean_coef1 (coefficient of x_0 in mu~_t),
    posterior_mean_coef2 (coefficient of x_t in mu~_t).
    """
    schedule = checked(schedule)
    betas = _betas_float64(schedule)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "posterior_variance": betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }


def extract(table: np.ndarray, t, like):
    """``table[t]`` in float64, shaped to broadcast against ``like`` ([B] -> [B, 1, ..., 1]).

    ``t`` is an int (same timestep for all) or an int array / LongTensor of shape [B].
    Returns a numpy array if ``like`` is numpy, else a float64 tensor on ``like``'s device.
    """
    if isinstance(like, torch.Tensor):
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().long()
        out = torch.from_numpy(table)[t]
        if out.ndim > 0:
            out = out.reshape(out.shape + (1,) * (like.ndim - out.ndim))
        return out.to(like.device)
    t = np.asarray(t, dtype=np.int64)
    out = table[t]
    if out.ndim > 0:
        out = out.reshape(out.shape + (1,) * (np.ndim(like) - out.ndim))
    return out


def as_float64(x):
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def q_mean_variance(tables: dict[str, np.ndarray], x0, t):
    """Mean and variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), in float64.

    ``x0``: torch tensor or numpy array [B, ...]; ``t``: int or [B] ints. Returns
    ``(mean, variance)``; ``variance`` broadcasts against ``x0``. (float64: not on MPS.)
    """
    x0 = as_float64(x0)
    abar = extract(tables["alphas_cumprod"], t, x0)
    return abar**0.5 * x0, 1.0 - abar


def q_posterior_mean_variance(tables: dict[str, np.ndarray], x0, x_t, t):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7), in float64.

    Returns ``(mean, variance)`` with mean = coef1[t] x_0 + coef2[t] x_t and variance = beta~_t
    (broadcasts against ``x_t``).
    """
    x0, x_t = as_float64(x0), as_float64(x_t)
    mean = extract(tables["posterior_mean_coef1"], t, x_t) * x0 + extract(tables["posterior_mean_coef2"], t, x_t) * x_t
    return mean, extract(tables["posterior_variance"], t, x_t)


def eps_to_posterior_mean(tables: dict[str, np.ndarray], x_t, t, eps):
    """mu(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)  (Ho et al. eq. 11), float64.

    Equals :func:`q_posterior_mean_variance`'s mean when ``eps`` is the noise that made ``x_t``
    from ``x_0``.
    """
    x_t, eps = as_float64(x_t), as_float64(eps)
    beta = extract(tables["betas"], t, x_t)
    alpha = extract(tables["alphas"], t, x_t)
    abar = extract(tables["alphas_cumprod"], t, x_t)
    return (x_t - beta / (1.0 - abar) ** 0.5 * eps) / alpha**0.5


# --------------------------------------------------------------------------- training side


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, via ``scheduler.add_noise`` (in x0's dtype).

    ``t``: LongTensor [B] (one timestep per sample) or an int (the same for all).
    """
    if not isinstance(t, torch.Tensor):
        t = torch.full((x0.shape[0],), int(t), dtype=torch.long)
    return scheduler.add_noise(x0, noise, t.to(device=x0.device, dtype=torch.long))


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, a LongTensor [batch] on ``device`` (drawn on the generator's device)."""
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=draw_device, dtype=torch.long)
    return t.to(device)


def diffusion_loss(eps_pred: torch.Tensor, noise: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """L_simple = MSE(eps_pred, noise), computed in float32 (or wider).

    reduction "mean": a scalar, the mean over all elements (= mean of per-sample losses, all samples
    having the same size); "none": per-sample losses [B] (mean over all non-batch dims), e.g. for the
    loss by timestep quartile that training reports.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, none")
    if eps_pred.shape != noise.shape:
        raise ValueError(f"eps_pred shape {tuple(eps_pred.shape)} != noise shape {tuple(noise.shape)}")
    dtype = torch.promote_types(torch.promote_types(eps_pred.dtype, noise.dtype), torch.float32)
    sq = F.mse_loss(eps_pred.to(dtype), noise.to(dtype), reduction="none")
    if reduction == "mean":
        return sq.mean()
    return sq.reshape(sq.shape[0], -1).mean(dim=1)

