r"""Diffusion math (DDPM family) over diffusers schedulers: no Ray, no I/O, no model.

Everything here is model-agnostic: a network enters only as ``eps_fn(x_t, t) -> eps``.
The noise schedules and update rules are diffusers' own (``DDPMScheduler``,
``DDIMScheduler``, ``DPMSolverMultistepScheduler``); this module picks their settings,
drives them, and provides float64 closed forms (computed the way
openai/improved-diffusion computes them) that ``tests/test_diffusion.py`` uses to prove
the schedulers right against Ho et al. 2020 ("Denoising Diffusion Probabilistic Models").

Notation (timesteps are 0-indexed, ``t = 0 .. T-1`` with ``T = num_train_timesteps``)::

    beta_t                                  noise schedule (ScheduleConfig)
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

Ancestral sampling (Ho et al. Algorithm 2; ``DDPMScheduler`` with ``variance_type="fixed_small"``)::

    x_{T-1} ~ N(0, I);   x_{t-1} = mu_theta(x_t, t) + sqrt(beta~_t) z,   z ~ N(0, I), no noise at t = 0

With fewer steps than T the chain is respaced (improved-diffusion's "respacing"): for
consecutive sampled timesteps t > t', alpha is replaced by abar_t / abar_t' in the formulas
above, which is exactly what ``DDPMScheduler.step`` does after ``set_timesteps(steps)``.
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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "BETA_SCHEDULES",
    "SAMPLERS",
    "TIMESTEP_SPACING",
    "ScheduleConfig",
    "add_noise",
    "diffusion_loss",
    "eps_to_posterior_mean",
    "guided_eps",
    "make_scheduler",
    "nfe_per_image",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "sample",
    "sample_timesteps",
    "schedule_tables",
    "timestep_quartile_losses",
]

SAMPLERS = ("ddpm", "ddim", "dpm")
"""Sampler names accepted by :func:`make_scheduler`, :func:`sample` and :func:`nfe_per_image`."""

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
"""Beta schedules (diffusers names) for which :func:`schedule_tables` has a float64 closed form."""

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


@dataclass
class ScheduleConfig:
    """The training noise schedule. Sampling must use the schedule the model was trained with."""

    num_train_timesteps: int = 1000
    """T, the number of discrete diffusion steps the model is trained on (t = 0 .. T-1)."""

    beta_schedule: str = "linear"
    """How beta_t varies with t, by diffusers name: "linear" (Ho et al.: linspace(beta_start,
    beta_end)), "scaled_linear" (Stable Diffusion: linspace(sqrt(beta_start), sqrt(beta_end))^2)
    or "squaredcos_cap_v2" (Nichol & Dhariwal cosine schedule; ignores beta_start/beta_end)."""

    beta_start: float = 1e-4
    """beta_0, the noise variance added at the first step (linear / scaled_linear)."""

    beta_end: float = 0.02
    """beta_{T-1}, the noise variance added at the last step (linear / scaled_linear)."""

    def __post_init__(self) -> None:
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        self.num_train_timesteps = int(self.num_train_timesteps)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"unknown beta_schedule {self.beta_schedule!r}; allowed: {', '.join(BETA_SCHEDULES)}"
            )
        if self.beta_schedule != "squaredcos_cap_v2" and not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")


def make_scheduler(sampler: str, schedule: ScheduleConfig | None = None):
    """A fresh diffusers scheduler for ``sampler`` on ``schedule`` (default :class:`ScheduleConfig`).

    ``"ddpm"`` -> ``DDPMScheduler`` (variance_type "fixed_small", i.e. beta~_t; its ``add_noise`` is
    the training-side forward process), ``"ddim"`` -> ``DDIMScheduler`` (eta = 0 at ``step``),
    ``"dpm"`` -> ``DPMSolverMultistepScheduler`` (DPM-Solver++, order 2). All predict epsilon,
    never clip or threshold x_0, and share the betas of ``schedule``. Schedulers are stateful:
    make a new one per sampling run.
    """
    _check_sampler(sampler)
    schedule = schedule if schedule is not None else ScheduleConfig()
    common: dict[str, Any] = dict(
        num_train_timesteps=schedule.num_train_timesteps,
        beta_schedule=schedule.beta_schedule,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        prediction_type="epsilon",
        timestep_spacing=TIMESTEP_SPACING,
    )
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


def _betas_float64(schedule: ScheduleConfig) -> np.ndarray:
    T = schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        return np.linspace(schedule.beta_start, schedule.beta_end, T, dtype=np.float64)
    if schedule.beta_schedule == "scaled_linear":
        return np.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, T, dtype=np.float64) ** 2
    # squaredcos_cap_v2: improved-diffusion's betas_for_alpha_bar(T, cosine, max_beta=0.999)
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)


def schedule_tables(schedule: ScheduleConfig | None = None) -> dict[str, np.ndarray]:
    """float64 tables of length T, as improved-diffusion's ``GaussianDiffusion.__init__`` computes them.

    Keys: betas, alphas, alphas_cumprod, alphas_cumprod_prev (abar_{t-1}, with abar_{-1} = 1),
    posterior_variance (beta~_t), posterior_mean_coef1 (coefficient of x_0 in mu~_t),
    posterior_mean_coef2 (coefficient of x_t in mu~_t).
    """
    schedule = schedule if schedule is not None else ScheduleConfig()
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


def _extract(table: np.ndarray, t, like):
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


def _f64(x):
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def q_mean_variance(tables: dict[str, np.ndarray], x0, t):
    """Mean and variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), in float64.

    ``x0``: torch tensor or numpy array [B, ...]; ``t``: int or [B] ints. Returns
    ``(mean, variance)``; ``variance`` broadcasts against ``x0``. (float64: not on MPS.)
    """
    x0 = _f64(x0)
    abar = _extract(tables["alphas_cumprod"], t, x0)
    return abar**0.5 * x0, 1.0 - abar


def q_posterior_mean_variance(tables: dict[str, np.ndarray], x0, x_t, t):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7), in float64.

    Returns ``(mean, variance)`` with mean = coef1[t] x_0 + coef2[t] x_t and variance = beta~_t
    (broadcasts against ``x_t``).
    """
    x0, x_t = _f64(x0), _f64(x_t)
    mean = _extract(tables["posterior_mean_coef1"], t, x_t) * x0 + _extract(tables["posterior_mean_coef2"], t, x_t) * x_t
    return mean, _extract(tables["posterior_variance"], t, x_t)


def eps_to_posterior_mean(tables: dict[str, np.ndarray], x_t, t, eps):
    """mu(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)  (Ho et al. eq. 11), float64.

    Equals :func:`q_posterior_mean_variance`'s mean when ``eps`` is the noise that made ``x_t``
    from ``x_0``.
    """
    x_t, eps = _f64(x_t), _f64(eps)
    beta = _extract(tables["betas"], t, x_t)
    alpha = _extract(tables["alphas"], t, x_t)
    abar = _extract(tables["alphas_cumprod"], t, x_t)
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
    having the same size); "none": per-sample losses [B] (mean over all non-batch dims), e.g. for
    :func:`timestep_quartile_losses`.
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


def timestep_quartile_losses(losses: torch.Tensor, t: torch.Tensor, num_train_timesteps: int) -> dict[str, float]:
    """Mean per-sample loss in each timestep quartile, as improved-diffusion logs it.

    Quartile q = floor(4 t / T); returns {"loss_q0": ..., ...} for the quartiles present in the batch.
    """
    q = (4 * t.detach().to("cpu", torch.long)) // num_train_timesteps
    losses = losses.detach().to("cpu", torch.float64)
    return {f"loss_q{k}": float(losses[q == k].mean()) for k in range(4) if bool((q == k).any())}


# --------------------------------------------------------------------------- sampling side


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_uncond + scale * (eps_cond - eps_uncond) (scale 1 = conditional)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def nfe_per_image(sampler: str, steps: int, guidance_scale: float = 1.0) -> int:
    """Network evaluations per image: one per step (all three samplers), doubled under guidance (scale != 1)."""
    _check_sampler(sampler)
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
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    *,
    sampler: str = "ddpm",
    steps: int = 1000,
    seed: int | Sequence[int] = 0,
    schedule: ScheduleConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], Any] | None = None,
) -> torch.Tensor:
    """Draw x_0 of ``shape`` = [B, ...] by running ``sampler`` for ``steps`` steps from x_{T-1} ~ N(0, I).

    ``eps_fn(x_t, t)`` returns the noise prediction for x_t ([B, ...], ``dtype``, on ``device``) at
    timesteps ``t`` (LongTensor [B], all equal). Guidance, conditioning and autocast are ``eps_fn``'s
    business (see :func:`guided_eps`). ``seed``: an int seeds one generator for the whole batch
    (reproducible as a batch); a sequence of B ints gives sample i its own generator for its initial
    noise and every per-step noise (reproducible per sample, whatever else is in the batch).
    ``progress(i, steps)`` is called after step i (1-based). Runs under ``torch.no_grad``.
    """
    _check_sampler(sampler)
    schedule = schedule if schedule is not None else ScheduleConfig()
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"shape must be [batch, ...] with batch >= 1, got {shape}")
    steps = int(steps)
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{schedule.num_train_timesteps}, got {steps}")
    device = torch.device(device)
    batch = shape[0]

    scheduler = make_scheduler(sampler, schedule)
    scheduler.set_timesteps(steps, device=device)
    generator = _generators(seed, batch)

    x = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        t_batch = torch.full((batch,), int(t), dtype=torch.long, device=device)
        eps = eps_fn(scheduler.scale_model_input(x, t), t_batch)
        if eps.shape != x.shape:
            raise ValueError(f"eps_fn returned shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
        # Only DDPM draws noise here (DDIM runs at eta = 0, DPM-Solver++ is an ODE solver);
        # passing the generator to all keeps any stochastic variant seeded the same way.
        x = scheduler.step(eps.to(x.dtype), t, x, generator=generator).prev_sample.to(dtype)
        if progress is not None:
            progress(i + 1, total)
    return x
