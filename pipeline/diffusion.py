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
    "REVERSE_VARIANCES",
    "SAMPLERS",
    "TIMESTEP_SPACING",
    "ScheduleConfig",
    "add_noise",
    "bits_per_dim",
    "diffusion_loss",
    "eps_to_posterior_mean",
    "gaussian_log_density",
    "guided_eps",
    "make_scheduler",
    "nfe_per_image",
    "normal_kl",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "sample",
    "sample_timesteps",
    "schedule_tables",
    "to_bits_per_dim",
    "vlb_terms",
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


# --------------------------------------------------------------------------- variational bound (NLL)
#
# Ho et al. 2020 eq. 5, with the paper's 1-based steps 1..T mapped onto the 0-based tables here
# (paper step s  <->  table index t = s - 1; paper x_s  <->  x_t with abar = alphas_cumprod[t]):
#
#     L = L_T                         KL( q(x_T | x_0) || N(0, I) )                 "prior"
#       + sum_{s=2..T} L_{s-1}        KL( q(x_{s-1} | x_s, x_0) || p(x_{s-1} | x_s) ) "denoising"
#       + L_0                         -log p(x_0 | x_1)                               "reconstruction"
#
#   prior:           paper x_T = index T-1, q = N(sqrt(abar[T-1]) x_0, (1 - abar[T-1]) I). Closed form, no noise.
#   denoising:       paper s = 2..T = indices t = 1..T-1 (T-1 terms). x_t ~ q(x_t | x_0) (one draw per term),
#                    q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t) from posterior_mean_coef1/2[t], posterior_variance[t];
#                    p(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2) with mu_theta the eps-form (eq. 11) at index t.
#   reconstruction:  paper x_1 = index 0: x_0' ~ q(x at index 0 | x_0) (one draw), p(x_0 | x_1) = N(mu_theta(x_1, 0),
#                    beta[0] I) where mu_theta(x_1, 0) = (x_1 - sqrt(beta_0) eps) / sqrt(alpha_0) is the x_0 prediction.
#
# Every term is an expectation over x_t ~ q(x_t | x_0), estimated with one noise draw per term (as
# improved-diffusion's calc_bpd_loop does); all are in nats per sample, summed over the data dims.
#
# Reconstruction variance. The table value for index 0 under "fixed_small", beta~_0, is 0 (abar_{-1} = 1), so
# that choice is degenerate. We use beta_0 (the paper's sigma_1^2 = beta_1), for both reverse variances: for data
# whose density is smooth on the scale sqrt(beta_0) (= 0.01 for the default schedule) the true q(x_0 | x_1) has
# variance beta_0 / alpha_0 (exactly s^2 beta_0 / (alpha_0 s^2 + beta_0) for N(m, s^2) data), so beta_0 is
# essentially optimal. improved-diffusion instead clips to beta~ at index 1 (about beta_0 / 2 on the linear
# schedule), harmless under its discretized 8-bit decoder but for a continuous density it costs
# 0.5 (2 - 1 - ln 2) ~ 0.15 nats/dim more (0.114 measured analytically for N(0, 1) data). Because latents are
# continuous, L_0 is a log *density*: it (and the total) can be negative, and bits/dim are differential
# quantities, not comparable with the discrete bits/dim of pixel models.
#
# Reverse variance of the denoising terms. "fixed_small" (default) is sigma_t^2 = beta~_t, what DDPMScheduler
# (variance_type "fixed_small") samples with, so the bound is the NLL bound of that sampler. "fixed_large" is
# sigma_t^2 = beta_t. For continuous data at unit scale fixed_small is far from the true reverse variance at small t
# (the true one is ~beta_t there), and the bound stays loose even with a perfect eps: for x_0 ~ N(m, s^2) and the
# exact eps the gap to the true NLL is 0.46 nats/dim (s = 1 or 0.5, linear schedule, T = 1000; 0.35 at T = 4000),
# while fixed_large gives a gap of 0 (s = 1: the reverse chain is then exact) to 0.001 nats/dim (s = 0.5).


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) in nats, float64 (broadcasting).

    = 0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1), as in
    improved-diffusion's ``losses.normal_kl``. Arguments are tensors or Python / numpy numbers.
    """
    args = [torch.as_tensor(_f64(a)) if not isinstance(a, torch.Tensor) else a.to(torch.float64)
            for a in (mean1, logvar1, mean2, logvar2)]
    mean1, logvar1, mean2, logvar2 = args
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_log_density(x, mean, logvar) -> torch.Tensor:
    """Elementwise log N(x; mean, exp(logvar)) in nats, float64: -0.5 (log 2 pi + logvar + (x - mean)^2 / var)."""
    x, mean, logvar = (torch.as_tensor(_f64(a)) if not isinstance(a, torch.Tensor) else a.to(torch.float64)
                       for a in (x, mean, logvar))
    return -0.5 * (math.log(2.0 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


REVERSE_VARIANCES = ("fixed_small", "fixed_large")
"""sigma_t^2 of p(x_{t-1} | x_t) in :func:`vlb_terms`: beta~_t ("fixed_small", the DDPM sampler's) or beta_t."""


def _sum_dims(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def _randn_like64(x0: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """[n * B, ...] standard normal noise in float64, drawn on the generator's device, moved to x0's."""
    draw_device = generator.device if generator is not None else x0.device
    shape = (n * x0.shape[0],) + tuple(x0.shape[1:])
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=draw_device).to(x0.device)


@torch.no_grad()
def vlb_terms(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    schedule: ScheduleConfig | None = None,
    timesteps: str | int = "all",
    generator: torch.Generator | None = None,
    batch_t: int | None = None,
    reverse_variance: str = "fixed_small",
) -> dict[str, torch.Tensor]:
    """The variational bound -log p(x_0) <= L (Ho et al. eq. 5) of continuous data ``x0`` [B, ...], per sample.

    See the comment above for the terms, the 0-based indexing and the two variance choices. Returns float64
    tensors [B] in nats (summed over the non-batch dims of ``x0``):

    - ``"prior"``: L_T = KL(q(x_{T-1} | x_0) || N(0, I)) (0-based index T-1), exact, no network call;
    - ``"denoising"``: sum over 0-based t = 1..T-1 of KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t));
    - ``"reconstruction"``: L_0 = -log N(x_0; mu_theta(x_1, t=0), beta_0 I) (a density: may be negative);
    - ``"total"``: prior + denoising + reconstruction;
    - ``"denoising_by_t"`` (only for ``timesteps="all"``): [B, T], column t = the KL at 0-based timestep t,
      column 0 = 0 (step 0's term is ``"reconstruction"``), so ``denoising == denoising_by_t.sum(1)``.

    ``timesteps="all"``: every t = 1..T-1 is evaluated, so T network calls' worth per sample (T-1 denoising + 1
    reconstruction; 1000 for the default schedule): fine for a small held-out set. An int ``k``: each sample
    draws k timesteps uniformly (with replacement) from 1..T-1 and the denoising sum is estimated by
    (T-1)/k * sum of those k KLs, an unbiased estimate (k + 1 network evaluations per sample). Either way each
    term uses one fresh draw x_t ~ q(x_t | x_0), so ``total`` is an unbiased estimate of the bound's value at x_0.

    ``eps_fn(x_t, t)``: as in :func:`sample` (x_t in x0's dtype and device, t a LongTensor [N] on that device),
    except that t may differ across the batch. ``batch_t`` timesteps (default 1) are evaluated per call, i.e.
    calls have batch size ``batch_t * B``. Noise (and, for int ``timesteps``, the timesteps) come from
    ``generator`` (on its device; default: torch's global RNG): order = reconstruction noise, [timesteps],
    then the denoising noise in chunk order. All math is float64 (so not on MPS); x_t is rounded to x0's dtype
    before the network sees it and the KLs use that rounded x_t. Runs under ``torch.no_grad``.
    """
    schedule = schedule if schedule is not None else ScheduleConfig()
    if reverse_variance not in REVERSE_VARIANCES:
        raise ValueError(f"unknown reverse_variance {reverse_variance!r}; allowed: {', '.join(REVERSE_VARIANCES)}")
    if not isinstance(x0, torch.Tensor) or x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError("x0 must be a tensor [B, ...] with B >= 1")
    T = schedule.num_train_timesteps
    if isinstance(timesteps, str):
        if timesteps != "all":
            raise ValueError(f"timesteps must be 'all' or a positive int, got {timesteps!r}")
        k = None
    elif isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool) and timesteps >= 1:
        k = int(timesteps)
    else:
        raise ValueError(f"timesteps must be 'all' or a positive int, got {timesteps!r}")
    batch_t = 1 if batch_t is None else int(batch_t)
    if batch_t < 1:
        raise ValueError(f"batch_t must be >= 1, got {batch_t}")

    tables = schedule_tables(schedule)
    p_var = tables["posterior_variance"] if reverse_variance == "fixed_small" else tables["betas"]
    tables = dict(tables, p_logvar=np.log(np.maximum(p_var, 1e-300)),
                  q_logvar=np.log(np.maximum(tables["posterior_variance"], 1e-300)))
    device, B = x0.device, x0.shape[0]
    x0_64 = x0.to(torch.float64)

    def run_eps(t_flat: torch.Tensor, noise: torch.Tensor):
        """x_t for x0 repeated len(t_flat) // B times (t-major), eps_fn on it; returns (x_t as seen, eps) float64."""
        n = t_flat.shape[0] // B
        x0_rep = x0_64.repeat((n,) + (1,) * (x0.ndim - 1))
        abar = _extract(tables["alphas_cumprod"], t_flat, x0_rep)
        x_in = (abar**0.5 * x0_rep + (1.0 - abar) ** 0.5 * noise).to(x0.dtype)
        eps = eps_fn(x_in, t_flat.to(device))
        if eps.shape != x_in.shape:
            raise ValueError(f"eps_fn returned shape {tuple(eps.shape)}, expected {tuple(x_in.shape)}")
        return x0_rep, x_in.to(torch.float64), eps.to(torch.float64)

    def denoising_kl(t_flat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x0_rep, x_t, eps = run_eps(t_flat, noise)
        true_mean, _ = q_posterior_mean_variance(tables, x0_rep, x_t, t_flat)
        mean = eps_to_posterior_mean(tables, x_t, t_flat, eps)
        kl = normal_kl(true_mean, _extract(tables["q_logvar"], t_flat, x_t), mean, _extract(tables["p_logvar"], t_flat, x_t))
        return _sum_dims(kl)  # [n * B], t-major

    # L_T: closed form over q(x_{T-1} | x_0).
    mean_T, var_T = q_mean_variance(tables, x0_64, T - 1)
    prior = _sum_dims(normal_kl(mean_T, torch.log(var_T), 0.0, 0.0))

    # L_0: -log p(x_0 | x_1), x_1 = table index 0, variance beta_0.
    t0 = torch.zeros(B, dtype=torch.long)
    _, x_1, eps_1 = run_eps(t0, _randn_like64(x0, 1, generator))
    mean_0 = eps_to_posterior_mean(tables, x_1, t0, eps_1)
    reconstruction = -_sum_dims(gaussian_log_density(x0_64, mean_0, math.log(tables["betas"][0])))

    out: dict[str, torch.Tensor] = {}
    if k is None:
        by_t = torch.zeros(B, T, dtype=torch.float64, device=device)
        for start in range(1, T, batch_t):
            ts = torch.arange(start, min(start + batch_t, T), dtype=torch.long)
            kl = denoising_kl(ts.repeat_interleave(B), _randn_like64(x0, len(ts), generator))
            by_t[:, start : start + len(ts)] = kl.reshape(len(ts), B).T
        denoising = by_t.sum(dim=1)
        out["denoising_by_t"] = by_t
    else:
        draw_device = generator.device if generator is not None else "cpu"
        t_draw = torch.randint(1, T, (k, B), generator=generator, device=draw_device, dtype=torch.long).cpu()
        acc = torch.zeros(B, dtype=torch.float64, device=device)
        for start in range(0, k, batch_t):
            rows = t_draw[start : start + batch_t]
            kl = denoising_kl(rows.reshape(-1), _randn_like64(x0, rows.shape[0], generator))
            acc += kl.reshape(rows.shape[0], B).sum(dim=0)
        denoising = acc * ((T - 1) / k)
    out.update(prior=prior, denoising=denoising, reconstruction=reconstruction, total=prior + denoising + reconstruction)
    return out


def to_bits_per_dim(terms: dict[str, torch.Tensor], dims: int) -> dict[str, torch.Tensor]:
    """Every tensor of :func:`vlb_terms`' output (nats per sample) divided by ln(2) * ``dims`` (dims per sample)."""
    dims = int(dims)
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    return {key: value.to(torch.float64) / (math.log(2.0) * dims) for key, value in terms.items()}


def bits_per_dim(terms: dict[str, torch.Tensor], x0_shape: Sequence[int]) -> dict[str, float]:
    """Batch-mean bits/dim of each per-sample term ([B] tensors) of :func:`vlb_terms`' output.

    ``x0_shape`` = [B, ...]: the dims per sample are prod(x0_shape[1:]). ``denoising_by_t`` is skipped.
    For continuous latents these are differential (density) bits/dim: they can be negative.
    """
    dims = int(np.prod([int(s) for s in x0_shape[1:]], dtype=np.int64)) if len(x0_shape) > 1 else 1
    per_sample = to_bits_per_dim({k: v for k, v in terms.items() if v.ndim == 1}, dims)
    return {key: float(value.mean()) for key, value in per_sample.items()}
