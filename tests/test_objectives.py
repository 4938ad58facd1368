"""The objectives beside epsilon (v, x0, rectified flow), their weightings and schedules, against closed forms.

For data x_0 ~ N(m, s^2 I) and x_t = alpha x_0 + sigma eps (diffusion: alpha = sqrt(abar), sigma =
sqrt(1 - abar); flow: alpha = 1 - sigma), the posterior mean is
    E[x_0 | x_t] = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha m),
and E[eps | x_t], E[v | x_t], E[eps - x_0 | x_t] follow linearly. Sampling with these exact predictors
must give back m and s, also for m outside [-1, 1].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import diffusion as D
from pipeline.config import ScheduleSection as Schedule

M = torch.tensor([2.5, -1.5])  # outside [-1, 1]: nothing may clip
S = 0.5
N = 12_000


def exact_predictor(prediction: str, schedule: Schedule):
    """fn(x_t, t) returning the exact prediction for N(M, S^2) data; t as diffusion.sample passes it."""
    abar = D.schedule_tables(schedule)["alphas_cumprod"] if prediction != "flow" else None

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if prediction == "flow":
            assert t.dtype.is_floating_point
            sigma = float(t[0]) / schedule.num_train_timesteps
            alpha = 1.0 - sigma
        else:
            assert t.dtype == torch.long
            a = float(abar[int(t[0])])
            alpha, sigma = a ** 0.5, (1 - a) ** 0.5
        m = M.double()
        x0 = m + alpha * S * S / (alpha ** 2 * S * S + sigma ** 2) * (x - alpha * m)
        if prediction == "x0":
            return x0.float()
        eps = (x - alpha * x0) / sigma
        if prediction == "epsilon":
            return eps.float()
        if prediction == "v":
            return (alpha * eps - sigma * x0).float()
        return (eps - x0).float()  # flow: the velocity

    return fn


CASES = {
    ("v", "ddim", 50, False): Schedule(prediction="v"),
    ("v", "dpm", 20, False): Schedule(prediction="v"),
    ("x0", "ddim", 50, False): Schedule(prediction="x0"),
    ("v", "ddim", 50, True): Schedule(prediction="v", zero_terminal_snr=True),
    ("x0", "dpm", 20, True): Schedule(prediction="x0", zero_terminal_snr=True),
    ("flow", "euler", 50, False): Schedule(prediction="flow"),
    ("flow", "dpm", 20, False): Schedule(prediction="flow"),
    ("flow", "euler", 50, "shift 3"): Schedule(prediction="flow", shift=3.0),
}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(map(str, c)))
def test_gaussian_data_recovered_by_every_objective_and_sampler(case, one_thread):
    prediction, sampler, steps, _ = case
    schedule = CASES[case]
    x = D.sample(exact_predictor(prediction, schedule), (N, 2), sampler=sampler, steps=steps, seed=7,
                 schedule=schedule).double()
    assert torch.isfinite(x).all()
    se_mean, se_std = S / math.sqrt(N), S / math.sqrt(2 * N)
    assert ((x.mean(0) - M.double()).abs() <= 4 * se_mean + 0.01 * M.abs()).all(), x.mean(0)
    assert ((x.std(0) - S).abs() <= 4 * se_std + 0.05 * S).all(), x.std(0)


def test_prediction_keyword_overrides_the_schedules():
    schedule = Schedule()  # epsilon
    fn = exact_predictor("v", Schedule(prediction="v"))
    x = D.sample(fn, (4000, 2), sampler="ddim", steps=30, seed=1, schedule=schedule, prediction="v").double()
    assert ((x.mean(0) - M.double()).abs() < 0.05).all()
    wrong = D.sample(fn, (4000, 2), sampler="ddim", steps=30, seed=1, schedule=schedule).double()  # read as eps
    assert ((wrong.mean(0) - M.double()).abs() > 0.5).any()  # so the keyword really changed something


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0", "flow"])
def test_targets_invert_to_the_data_and_the_noise(prediction):
    """The training target at x_t gives back x_0 and eps through the closed-form conversions."""
    schedule = Schedule(prediction=prediction)
    scheduler = None if prediction == "flow" else D.make_scheduler("ddpm", schedule)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(64, 3, 4, 4, generator=g).double(), torch.randn(64, 3, 4, 4, generator=g).double()
    level = D.draw_noise_levels(schedule, 64, g)
    x_t = D.noisy_input(schedule, scheduler, x0, noise, level)
    want = D.target(schedule, scheduler, x0, noise, level)
    shape = (-1, 1, 1, 1)
    if prediction == "flow":
        kw = {"sigma": level.double().reshape(shape)}
        assert torch.allclose(x_t, (1 - kw["sigma"]) * x0 + kw["sigma"] * noise)
    else:
        abar = torch.from_numpy(D.schedule_tables(schedule)["alphas_cumprod"])[level].reshape(shape)
        kw = {"abar": abar}
    tol = dict(atol=2e-5, rtol=1e-4) if prediction != "flow" else dict(atol=1e-9, rtol=0)  # diffusers' float32 abar
    keep = (level < 990) if prediction == "epsilon" else torch.ones(64, dtype=torch.bool)  # eps -> x0 divides by a
    assert torch.allclose(D.predicted_x0(prediction, want, x_t, **kw)[keep], x0[keep], **tol)
    keep = (level > 10) if prediction == "x0" else torch.ones(64, dtype=torch.bool)  # x0 -> eps divides by b
    assert torch.allclose(D.predicted_eps(prediction, want, x_t, **kw)[keep], noise[keep], **tol)
    if prediction == "v":
        a, b = abar.sqrt(), (1 - abar).sqrt()
        assert torch.allclose(want, a * noise - b * x0, atol=2e-5)


def test_min_snr_weights_are_the_closed_form():
    """Hang et al.: every objective's weighted loss is min(SNR, gamma) ||x_0 - x_0_hat||^2."""
    t = torch.arange(0, 1000, 37)
    gamma = 5.0
    abar = torch.from_numpy(D.schedule_tables(Schedule())["alphas_cumprod"])[t]
    snr = abar / (1 - abar)
    for prediction, want in (("epsilon", torch.clamp(snr, max=gamma) / snr),
                             ("v", torch.clamp(snr, max=gamma) / (snr + 1)), ("x0", torch.clamp(snr, max=gamma))):
        schedule = Schedule(prediction=prediction)
        got = D.loss_weights(schedule, D.make_scheduler("ddpm", schedule), t, "min_snr", gamma).double()
        assert torch.allclose(got, want, rtol=1e-3), prediction  # diffusers computes the SNR in float32
    assert D.loss_weights(Schedule(), D.make_scheduler("ddpm"), t, "none", gamma) is None
    with pytest.raises(ValueError, match="diffusion objectives"):
        D.loss_weights(Schedule(prediction="flow"), None, torch.rand(4), "min_snr", gamma)


def test_flow_noise_levels_logit_normal_and_shift():
    g = torch.Generator().manual_seed(0)
    sigma = D.draw_noise_levels(Schedule(prediction="flow", timestep_sampling="logit_normal", logit_mean=0.5,
                                         logit_std=0.8), 200_000, g).double()
    logit = torch.log(sigma / (1 - sigma))
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.8) < 0.01
    u = D.draw_noise_levels(Schedule(prediction="flow"), 200_000, torch.Generator().manual_seed(1)).double()
    assert abs(u.mean() - 0.5) < 0.005 and 0 <= u.min() and u.max() <= 1  # uniform
    shifted = D.draw_noise_levels(Schedule(prediction="flow", shift=3.0), 200_000, torch.Generator().manual_seed(1))
    assert torch.allclose(shifted.double(), 3 * u / (1 + 2 * u), atol=1e-6)  # SD3's shift, same draws
    assert D.model_time(Schedule(prediction="flow"), torch.tensor([0.25])).item() == 250.0


def test_zero_terminal_snr_tables():
    """Lin et al. Algorithm 1: abar ends at exactly 0, starts where it did, and diffusers agrees."""
    plain, zero = Schedule(prediction="v"), Schedule(prediction="v", zero_terminal_snr=True)
    a, z = D.schedule_tables(plain)["alphas_cumprod"], D.schedule_tables(zero)["alphas_cumprod"]
    assert z[-1] == 0.0 and a[-1] > 0 and math.isclose(z[0], a[0], rel_tol=1e-12)
    assert np.all(np.diff(z) < 0)
    ddpm = D.make_scheduler("ddpm", zero)
    np.testing.assert_allclose(ddpm.alphas_cumprod.double().numpy(), z, atol=1e-6)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_bound_is_the_same_whatever_the_network_predicts(prediction):
    """The bound of the exact predictor, given as v or x_0, equals the one given as eps (same noise)."""
    schedule = Schedule(num_train_timesteps=50)
    x0 = (M + S * torch.randn(6, 2, generator=torch.Generator().manual_seed(4))).double()
    ref = D.vlb_terms(exact_predictor("epsilon", schedule), x0, schedule=schedule,
                      generator=torch.Generator().manual_seed(9))
    got = D.vlb_terms(exact_predictor(prediction, Schedule(num_train_timesteps=50, prediction=prediction)), x0,
                      schedule=schedule, prediction=prediction, generator=torch.Generator().manual_seed(9))
    for key in ("prior", "denoising", "reconstruction", "total"):
        assert torch.allclose(got[key], ref[key], rtol=1e-5, atol=1e-5), key
    with pytest.raises(ValueError, match="not flow"):
        D.vlb_terms(exact_predictor("flow", Schedule(prediction="flow")), x0, schedule=Schedule(prediction="flow"))
