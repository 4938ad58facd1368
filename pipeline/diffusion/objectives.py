r"""Training objectives: what the network is shown and what it must predict, for each ``schedule.prediction``.
No Ray, no I/O, no model.

Diffusion objectives (x_t = a x_0 + b eps, a = sqrt(abar_t), b = sqrt(1 - abar_t), t an integer timestep)::

    epsilon   target eps                                   (Ho et al. 2020)
    v         target v = a eps - b x_0                     (Salimans & Ho 2022; diffusers' get_velocity)
    x0        target x_0
    SNR(t) = a^2 / b^2; min-SNR weights (Hang et al. 2023), making each objective's loss
    min(SNR, gamma) ||x_0 - x_0_hat||^2:  epsilon min(SNR, gamma) / SNR,  v min(SNR, gamma) / (SNR + 1),
    x0 min(SNR, gamma)

Rectified flow (``flow``, as SD3 trains it; sigma in [0, 1] is the noise level)::

    x_t = (1 - sigma) x_0 + sigma eps        target u = eps - x_0   (so x_0 = x_t - sigma u)
    sigma ~ Uniform[0, 1] or sigmoid(N(logit_mean, logit_std))  (logit-normal), then the SD3 shift
    sigma -> s sigma / (1 + (s - 1) sigma)

The network's time input (:func:`model_time`): the integer timestep t for the diffusion objectives; for
flow the float ``T * sigma`` (T = num_train_timesteps, 1000 by default), diffusers' convention for
``FlowMatchEulerDiscreteScheduler`` timesteps.
"""

from __future__ import annotations

import torch

from pipeline.config import ScheduleSection
from pipeline.diffusion.schedule import sample_timesteps

DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample", "flow": "flow_prediction"}
"""``schedule.prediction`` -> diffusers' ``prediction_type``."""


def is_flow(schedule: ScheduleSection) -> bool:
    return schedule.prediction == "flow"


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift of flow noise levels: s sigma / (1 + (s - 1) sigma) (identity at s = 1)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def draw_noise_levels(schedule: ScheduleSection, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """One training noise level per sample: an integer timestep t ~ Uniform{0..T-1} (LongTensor) for the
    diffusion objectives; for flow a float sigma in [0, 1] from ``schedule.timestep_sampling``, shifted."""
    if not is_flow(schedule):
        return sample_timesteps(batch, schedule.num_train_timesteps, generator)
    if schedule.timestep_sampling == "logit_normal":
        u = torch.randn(batch, generator=generator) * schedule.logit_std + schedule.logit_mean
        sigma = torch.sigmoid(u)
    else:
        sigma = torch.rand(batch, generator=generator)
    return shift_sigmas(sigma, schedule.shift)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_input(schedule: ScheduleSection, scheduler, x0: torch.Tensor, noise: torch.Tensor,
                level: torch.Tensor) -> torch.Tensor:
    """x_t at each sample's noise level: ``scheduler.add_noise`` (DDPM) or (1 - sigma) x_0 + sigma eps."""
    if is_flow(schedule):
        sigma = _bcast(level, x0)
        return (1 - sigma) * x0 + sigma * noise
    return scheduler.add_noise(x0, noise, level.to(device=x0.device, dtype=torch.long))


def target(schedule: ScheduleSection, scheduler, x0: torch.Tensor, noise: torch.Tensor,
           level: torch.Tensor) -> torch.Tensor:
    """What the network must output for x_t (see the module doc)."""
    p = schedule.prediction
    if p == "epsilon":
        return noise
    if p == "x0":
        return x0
    if p == "v":
        return scheduler.get_velocity(x0, noise, level.to(device=x0.device, dtype=torch.long))
    return noise - x0  # flow


def model_time(schedule: ScheduleSection, level: torch.Tensor) -> torch.Tensor:
    """The network's time input for a noise level: t itself, or T * sigma (float) for flow."""
    if is_flow(schedule):
        return level.float() * schedule.num_train_timesteps
    return level


def loss_weights(schedule: ScheduleSection, scheduler, level: torch.Tensor, weighting: str,
                 gamma: float) -> torch.Tensor | None:
    """Per-sample loss weights [B], or None for none. min_snr: see the module doc (diffusion objectives)."""
    if weighting == "none":
        return None
    if is_flow(schedule):
        raise ValueError("min_snr weighting is for the diffusion objectives (flow: use timestep_sampling)")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, level.long()).double()
    clipped = torch.clamp(snr, max=gamma)
    if schedule.prediction == "epsilon":
        return (clipped / snr).float()
    if schedule.prediction == "v":
        return (clipped / (snr + 1)).float()
    return clipped.float()  # x0


def predicted_x0(prediction: str, output, x_t, abar=None, sigma=None):
    """x_0 implied by a network output at x_t: from abar_t (diffusion objectives) or sigma (flow).
    Works on tensors and numbers alike (float64 in, float64 out)."""
    if prediction == "x0":
        return output
    if prediction == "flow":
        return x_t - sigma * output
    a, b = abar ** 0.5, (1 - abar) ** 0.5
    if prediction == "v":
        return a * x_t - b * output
    return (x_t - b * output) / a  # epsilon


def predicted_eps(prediction: str, output, x_t, abar=None, sigma=None):
    """eps implied by a network output at x_t (as predicted_x0)."""
    if prediction == "epsilon":
        return output
    if prediction == "flow":
        return x_t + (1 - sigma) * output
    a, b = abar ** 0.5, (1 - abar) ** 0.5
    if prediction == "v":
        return b * x_t + a * output
    return (x_t - a * output) / b  # x0
