r"""The variational bound on -log p(x_0) (Ho et al. 2020 eq. 5) in float64, estimated with one noise
draw per term as improved-diffusion's ``calc_bpd_loop`` does. No Ray, no I/O, no model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.config import ScheduleSection
from pipeline.diffusion.objectives import predicted_x0
from pipeline.diffusion.schedule import (
    checked,
    extract,
    as_float64,
    eps_to_posterior_mean,
    q_mean_variance,
    q_posterior_mean_variance,
    schedule_tables,
)

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
    args = [torch.as_tensor(as_float64(a)) if not isinstance(a, torch.Tensor) else a.to(torch.float64)
            for a in (mean1, logvar1, mean2, logvar2)]
    mean1, logvar1, mean2, logvar2 = args
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_log_density(x, mean, logvar) -> torch.Tensor:
    """Elementwise log N(x; mean, exp(logvar)) in nats, float64: -0.5 (log 2 pi + logvar + (x - mean)^2 / var)."""
    x, mean, logvar = (torch.as_tensor(as_float64(a)) if not isinstance(a, torch.Tensor) else a.to(torch.float64)
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
    schedule: ScheduleSection | None = None,
    timesteps: str | int = "all",
    generator: torch.Generator | None = None,
    batch_t: int | None = None,
    reverse_variance: str = "fixed_small",
    prediction: str | None = None,
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

    ``eps_fn(x_t, t)``: the network's output for ``prediction`` (default ``schedule.prediction``: epsilon, v
    or x0), as in :func:`sample` (x_t in x0's dtype and device, t a LongTensor [N] on that device), except
    that t may differ across the batch. ``batch_t`` timesteps (default 1) are evaluated per call, i.e.
    calls have batch size ``batch_t * B``. Noise (and, for int ``timesteps``, the timesteps) come from
    ``generator`` (on its device; default: torch's global RNG): order = reconstruction noise, [timesteps],
    then the denoising noise in chunk order. All math is float64 (so not on MPS); x_t is rounded to x0's dtype
    before the network sees it and the KLs use that rounded x_t. Runs under ``torch.no_grad``.
    """
    schedule = checked(schedule)
    prediction = prediction or schedule.prediction
    if prediction == "flow":
        raise ValueError("the variational bound is defined here for the diffusion objectives (epsilon, v, x0), not flow")
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
        abar = extract(tables["alphas_cumprod"], t_flat, x0_rep)
        x_in = (abar**0.5 * x0_rep + (1.0 - abar) ** 0.5 * noise).to(x0.dtype)
        eps = eps_fn(x_in, t_flat.to(device))
        if eps.shape != x_in.shape:
            raise ValueError(f"eps_fn returned shape {tuple(eps.shape)}, expected {tuple(x_in.shape)}")
        return x0_rep, x_in.to(torch.float64), eps.to(torch.float64)

    def model_mean(x_t: torch.Tensor, t_flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """mu_theta(x_t, t): the eps form (Ho et al. eq. 11) for epsilon; else the posterior mean at the
        predicted x_0, which stays finite where alpha_t = 0 (a zero-terminal-SNR schedule's last step)."""
        if prediction == "epsilon":
            return eps_to_posterior_mean(tables, x_t, t_flat, out)
        x0_hat = predicted_x0(prediction, out, x_t, abar=extract(tables["alphas_cumprod"], t_flat, x_t))
        return q_posterior_mean_variance(tables, x0_hat, x_t, t_flat)[0]

    def denoising_kl(t_flat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x0_rep, x_t, eps = run_eps(t_flat, noise)
        true_mean, _ = q_posterior_mean_variance(tables, x0_rep, x_t, t_flat)
        mean = model_mean(x_t, t_flat, eps)
        kl = normal_kl(true_mean, extract(tables["q_logvar"], t_flat, x_t), mean, extract(tables["p_logvar"], t_flat, x_t))
        return _sum_dims(kl)  # [n * B], t-major

    # L_T: closed form over q(x_{T-1} | x_0).
    mean_T, var_T = q_mean_variance(tables, x0_64, T - 1)
    prior = _sum_dims(normal_kl(mean_T, torch.log(var_T), 0.0, 0.0))

    # L_0: -log p(x_0 | x_1), x_1 = table index 0, variance beta_0.
    t0 = torch.zeros(B, dtype=torch.long)
    _, x_1, eps_1 = run_eps(t0, _randn_like64(x0, 1, generator))
    mean_0 = model_mean(x_1, t0, eps_1)
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
