"""pipeline.diffusion's variational bound (Ho et al. 2020 eq. 5) for continuous data, against closed forms.

Reference values come from the paper's formulas written out here with numpy (betas, abar, beta~, the
posterior mean coefficient), never from the module's tables. Indexing: 0-based t = 0..T-1, paper step = t + 1.

Measured with the default schedule (linear 1e-4..0.02, T = 1000), float64:
- prior term for N(0, 1) data: 2.9e-5 bits/dim (closed form: 0.5 abar_{T-1} E[x^2] / ln 2 = 2.9e-5);
- x_0 ~ N(m, 0.5^2 I) in 2-d with the exact eps predictor (analytic NLL 0.7258 nats/dim): the expected
  bound is 1.1821 nats/dim with reverse variance "fixed_small" (gap 0.456 nats/dim = 0.66 bits/dim: beta~_t
  is far below the true reverse variance ~beta_t at small t, a cost of the variance choice, not of the eps) and
  0.7269 with "fixed_large" (gap 0.0011 nats/dim); the Monte-Carlo estimates over 2000 points agree with
  these to within their standard errors (~0.02 nats/dim).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from pipeline import diffusion as D
from pipeline.config import ScheduleSection as ScheduleConfig

T = 1000


def paper_tables(T: int = T, beta_start: float = 1e-4, beta_end: float = 0.02) -> dict[str, np.ndarray]:
    """Ho et al. linear schedule and eqs. 4, 7, written out independently (index t = paper step t + 1)."""
    betas = np.array([beta_start + (beta_end - beta_start) * i / (T - 1) for i in range(T)], dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return {
        "beta": betas,
        "alpha": 1.0 - betas,
        "abar": abar,
        "beta_tilde": betas * (1.0 - abar_prev) / (1.0 - abar),  # eq. 7
        "coef1": np.sqrt(abar_prev) * betas / (1.0 - abar),  # coefficient of x_0 in mu~_t, eq. 7
    }


def gaussian_eps(m: torch.Tensor, s: float, abar: np.ndarray):
    """Exact E[eps | x_t] for x_0 ~ N(m, s^2 I): sqrt(1 - abar)(x_t - sqrt(abar) m) / (abar s^2 + 1 - abar).

    Handles a different t per row (vlb_terms batches several timesteps per call).
    """
    abar_t = torch.from_numpy(abar)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        a = abar_t[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * m.to(x.dtype)) / (a * s * s + 1 - a)

    return eps_fn


def analytic_gaussian_bound(tab: dict[str, np.ndarray], m: np.ndarray, s: float, variance: str) -> float:
    """E_{x_0 ~ N(m, s^2)}[L] per dim for the exact eps, in nats.

    With the exact eps, mu_theta(x_t, t) = E[x_{t-1} | x_t], so mu~_t - mu_theta = coef1_t (x_0 - E[x_0 | x_t]),
    whose expected square is coef1_t^2 V_t with V_t = Var(x_0 | x_t) = s^2 (1 - abar_t) / (abar_t s^2 + 1 - abar_t).
    """
    abar, beta, bt, c1 = tab["abar"], tab["beta"], tab["beta_tilde"], tab["coef1"]
    V = s**2 * (1 - abar) / (abar * s**2 + 1 - abar)
    aT = abar[-1]
    prior = 0.5 * (-1 - math.log(1 - aT) + (1 - aT) + aT * float(np.mean(m**2 + s**2)))
    pv = bt if variance == "fixed_small" else beta
    kl = 0.5 * (np.log(pv[1:] / bt[1:]) + bt[1:] / pv[1:] - 1 + c1[1:] ** 2 * V[1:] / pv[1:])
    recon = 0.5 * math.log(2 * math.pi * beta[0]) + 0.5 * V[0] / beta[0]  # -E log N(x_0; E[x_0|x_1], beta_0)
    return prior + float(kl.sum()) + recon


# --------------------------------------------------------------------------- Gaussian helpers


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    got = D.normal_kl(m1, lv1, m2, lv2)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # Closed form KL(N(mu, s1^2) || N(0, 1)) = 0.5 (s1^2 + mu^2 - 1 - log s1^2), scalars broadcast.
    assert float(D.normal_kl(torch.tensor(0.75), math.log(0.3), 0.0, 0.0)) == pytest.approx(
        0.5 * (0.3 + 0.5625 - 1 - math.log(0.3)), rel=1e-12
    )
    assert float(D.normal_kl(1.5, -2.0, 1.5, -2.0)) == 0.0
    assert bool((D.normal_kl(m1, lv1, m2, lv2) >= 0).all())


def test_gaussian_log_density_matches_torch():
    g = torch.Generator().manual_seed(1)
    x, mu, lv = (torch.randn(40, generator=g, dtype=torch.float64) for _ in range(3))
    ref = torch.distributions.Normal(mu, (0.5 * lv).exp()).log_prob(x)
    torch.testing.assert_close(D.gaussian_log_density(x, mu, lv), ref, rtol=1e-12, atol=1e-12)
    # float32 inputs are promoted; a density can be positive (so -log p, like L_0, can be negative).
    val = D.gaussian_log_density(torch.tensor([0.0]), torch.tensor([0.0], dtype=torch.float32), math.log(1e-4))
    assert val.dtype == torch.float64 and float(val) == pytest.approx(-0.5 * math.log(2 * math.pi * 1e-4))
    assert float(val) > 0


# --------------------------------------------------------------------------- the three terms


def test_prior_term_negligible_for_default_schedule():
    """L_T for unit-scale latents: ~2.9e-5 bits/dim, matching 0.5 (abar x^2 - log(1 - abar) - abar) per dim."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(16, 4, 8, 8, generator=g)  # float32, like VAE latents scaled to unit variance
    seen = []

    def eps_fn(x, t):
        seen.append(x.dtype)
        return torch.zeros_like(x)

    out = D.vlb_terms(eps_fn, x0, timesteps=1, generator=g)
    assert set(seen) == {torch.float32}
    assert all(v.dtype == torch.float64 and v.shape == (16,) for v in out.values())
    aT = paper_tables()["abar"][-1]
    x64 = x0.double().reshape(16, -1)
    ref = 0.5 * (aT * x64**2 - math.log(1 - aT) - aT).sum(1)
    torch.testing.assert_close(out["prior"], ref, rtol=1e-9, atol=0.0)
    bpd = D.bits_per_dim(out, x0.shape)
    assert 1e-5 < bpd["prior"] < 1e-4, bpd["prior"]  # measured 2.9e-5
    assert bpd["total"] == pytest.approx(bpd["prior"] + bpd["denoising"] + bpd["reconstruction"], rel=1e-12)


def _offset_eps_fn(v: torch.Tensor, abar: np.ndarray, delta, calls: list | None = None):
    """For x_0 = v in every row: eps = (exact noise that made x_t) + delta(t), so every KL is deterministic."""
    abar_t = torch.from_numpy(abar)

    def eps_fn(x, t):
        if calls is not None:
            calls.append(t.clone())
        a = abar_t[t].reshape(-1, *([1] * (x.ndim - 1)))
        return (x - a.sqrt() * v) / (1 - a).sqrt() + delta(t).reshape(a.shape)

    return eps_fn


def _offset_reference(tab, v: np.ndarray, delta_np: np.ndarray, variance: str):
    """Per-t terms for eps = true noise + delta_t (per sample, summed over dims), from the paper's formulas.

    mu_theta - mu~_t = -beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) delta_t (eq. 11 vs eq. 7), so
    KL_t = dims * 0.5 (log(s2/beta~) + beta~/s2 - 1 + diff^2 / s2), s2 the reverse variance; at t = 0 (paper
    step 1) -log N(x_0; x_0 + diff_0, beta_0) = dims * (0.5 log(2 pi beta_0) + 0.5 delta_0^2 / alpha_0).
    """
    dims = v.size
    beta, alpha, abar, bt = tab["beta"], tab["alpha"], tab["abar"], tab["beta_tilde"]
    diff2 = beta**2 / (alpha * (1 - abar)) * delta_np**2
    pv = bt if variance == "fixed_small" else beta
    kl = np.zeros_like(beta)
    kl[1:] = dims * 0.5 * (np.log(pv[1:] / bt[1:]) + bt[1:] / pv[1:] - 1 + diff2[1:] / pv[1:])
    recon = dims * (0.5 * math.log(2 * math.pi * beta[0]) + 0.5 * delta_np[0] ** 2 / alpha[0])
    aT = abar[-1]
    prior = float(np.sum(0.5 * (aT * v**2 - math.log(1 - aT) - aT)))
    return prior, kl, recon


@pytest.mark.parametrize("variance", D.REVERSE_VARIANCES)
def test_all_timesteps_exact_terms_and_indexing(variance):
    """timesteps="all": every term equals the closed form, at the right 0-based index; eps_fn sees each t once."""
    tab = paper_tables()
    v = torch.tensor([0.8, -0.3, 1.2], dtype=torch.float64)
    delta = lambda t: 0.3 + 0.2 * torch.sin(t.double() / 37.0)  # noqa: E731
    calls: list[torch.Tensor] = []
    x0 = v.repeat(2, 1)
    out = D.vlb_terms(_offset_eps_fn(v, tab["abar"], delta, calls), x0, generator=torch.Generator().manual_seed(3),
                      batch_t=64, reverse_variance=variance)
    prior, kl, recon = _offset_reference(tab, v.numpy(), delta(torch.arange(T)).numpy(), variance)
    by_t = out["denoising_by_t"]
    assert by_t.shape == (2, T) and bool((by_t[:, 0] == 0).all())
    torch.testing.assert_close(by_t, torch.from_numpy(kl).repeat(2, 1), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out["denoising"], by_t.sum(1), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(out["reconstruction"], torch.full((2,), recon, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["prior"], torch.full((2,), prior, dtype=torch.float64), rtol=1e-9, atol=0.0)
    torch.testing.assert_close(out["total"], out["prior"] + out["denoising"] + out["reconstruction"])
    ts = torch.cat(calls)
    assert int((ts == 0).sum()) == 2  # one reconstruction call at t = 0 (paper's x_1), B rows
    assert torch.equal(torch.sort(ts[ts > 0]).values, torch.arange(1, T).repeat_interleave(2))  # t = 1..T-1 once


def test_monte_carlo_timesteps_are_unbiased():
    """(T-1)/k * sum over k uniform t in 1..T-1: its mean over many draws matches the exact sum.

    The KLs are made deterministic given t (see _offset_eps_fn), so the only randomness is the choice of t and
    the standard error is known exactly: (T-1) sd_t(KL_t) / sqrt(k * draws).
    """
    tab = paper_tables()
    v = torch.tensor([0.5, -1.0], dtype=torch.float64)
    delta = lambda t: 0.3 + 0.2 * torch.sin(t.double() / 37.0)  # noqa: E731
    eps_fn = _offset_eps_fn(v, tab["abar"], delta)
    _, kl, _ = _offset_reference(tab, v.numpy(), delta(torch.arange(T)).numpy(), "fixed_small")
    exact = float(kl.sum())
    k, B, seeds = 4, 2000, range(5)
    est = torch.cat([
        D.vlb_terms(eps_fn, v.repeat(B, 1), timesteps=k, generator=torch.Generator().manual_seed(s), batch_t=2)["denoising"]
        for s in seeds
    ])
    se = (T - 1) * float(np.std(kl[1:])) / math.sqrt(k * len(est))
    assert abs(float(est.mean()) - exact) < 4 * se, (float(est.mean()), exact, se)
    assert se < 0.05 * exact  # the check has teeth: a 5% bias would fail it
    # Each sample's draw is a (T-1)/k multiple of KLs at timesteps in 1..T-1 (never t = 0).
    assert float(est.min()) >= (T - 1) * float(kl[1:].min()) - 1e-9


# --------------------------------------------------------------------------- the bound against the true NLL


@pytest.fixture(scope="module")
def gaussian_data():
    m, s = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.5
    x0 = m + s * torch.randn(2000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return m, s, x0


@pytest.mark.parametrize("variance", D.REVERSE_VARIANCES)
def test_bound_is_above_gaussian_nll_and_matches_closed_form(gaussian_data, variance):
    """x_0 ~ N(m, s^2 I), exact eps: the bound's mean is >= the NLL and equals its closed-form expectation.

    Tolerance: 4.5 standard errors of the Monte-Carlo mean (x_0 and the x_t draws, ~0.02 nats/dim here).
    The gap bound - NLL is the cost of the reverse variance (0.456 nats/dim for fixed_small, 0.0011 for
    fixed_large at s = 0.5), computed exactly by analytic_gaussian_bound.
    """
    m, s, x0 = gaussian_data
    tab = paper_tables()
    dims = x0.shape[1]
    out = D.vlb_terms(gaussian_eps(m, s, tab["abar"]), x0, generator=torch.Generator().manual_seed(5), batch_t=200,
                      reverse_variance=variance)
    total = out["total"] / dims
    mean, se = float(total.mean()), float(total.std()) / math.sqrt(len(total))
    nll = 0.5 * math.log(2 * math.pi * s * s) + 0.5  # E[-log N(x_0; m, s^2)] per dim
    expected = analytic_gaussian_bound(tab, m.numpy(), s, variance)
    assert expected >= nll
    assert abs(mean - expected) < 4.5 * se, (mean, expected, se)
    # Paired with the exact -log p(x_0) of the same points (removes the x_0 sampling noise from the gap).
    gap = total + D.gaussian_log_density(x0, m, math.log(s * s)).sum(1) / dims
    gap_mean, gap_se = float(gap.mean()), float(gap.std()) / math.sqrt(len(gap))
    assert gap_mean > -4.5 * gap_se  # an upper bound on the NLL
    assert abs(gap_mean - (expected - nll)) < 4.5 * gap_se, (gap_mean, expected - nll, gap_se)
    if variance == "fixed_small":
        assert 0.40 < expected - nll < 0.50  # 0.456: the fixed_small reverse variance is loose at small t
    else:
        assert 0 < expected - nll < 0.005  # 0.0011
    bpd = D.bits_per_dim(out, x0.shape)
    assert bpd["total"] == pytest.approx(mean / math.log(2), rel=1e-12)


def test_bad_eps_gives_clearly_larger_bound(gaussian_data):
    m, s, x0 = gaussian_data
    x0 = x0[:500]
    tab = paper_tables()
    good = D.vlb_terms(gaussian_eps(m, s, tab["abar"]), x0, generator=torch.Generator().manual_seed(6), batch_t=250)
    bad = D.vlb_terms(lambda x, t: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(6), batch_t=250)
    g, b = D.bits_per_dim(good, x0.shape), D.bits_per_dim(bad, x0.shape)
    assert b["total"] > g["total"] + 1.0, (g, b)  # measured ~1.7 vs ~10 bits/dim
    assert b["denoising"] > g["denoising"] + 1.0
    assert b["prior"] == g["prior"]  # L_T does not involve the network


# --------------------------------------------------------------------------- conversions and arguments


def test_bits_per_dim_and_to_bits_per_dim():
    terms = {"total": torch.tensor([2.0, 4.0], dtype=torch.float64), "denoising_by_t": torch.ones(2, 5)}
    per = D.to_bits_per_dim(terms, 6)
    torch.testing.assert_close(per["total"], terms["total"] / (6 * math.log(2)))
    assert per["denoising_by_t"].shape == (2, 5)
    assert D.bits_per_dim(terms, (2, 2, 3)) == {"total": pytest.approx(3.0 / (6 * math.log(2)), rel=1e-12)}
    with pytest.raises(ValueError):
        D.to_bits_per_dim(terms, 0)


def test_reproducible_and_argument_checks():
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(7))
    eps_fn = lambda x, t: 0.5 * x  # noqa: E731
    small = ScheduleConfig(num_train_timesteps=20)
    a = D.vlb_terms(eps_fn, x0, schedule=small, generator=torch.Generator().manual_seed(8), batch_t=3)
    b = D.vlb_terms(eps_fn, x0, schedule=small, generator=torch.Generator().manual_seed(8), batch_t=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["denoising_by_t"].shape == (3, 20)
    mc = D.vlb_terms(eps_fn, x0, schedule=small, timesteps=5, generator=torch.Generator().manual_seed(8))
    assert "denoising_by_t" not in mc and mc["total"].shape == (3,)
    for bad in ("some", 0, -1, True, 2.5):
        with pytest.raises(ValueError):
            D.vlb_terms(eps_fn, x0, schedule=small, timesteps=bad)
    with pytest.raises(ValueError):
        D.vlb_terms(eps_fn, x0, schedule=small, batch_t=0)
    with pytest.raises(ValueError):
        D.vlb_terms(eps_fn, x0, schedule=small, reverse_variance="learned")
    with pytest.raises(ValueError):
        D.vlb_terms(lambda x, t: x[:, :1], x0, schedule=small)
