"""Diffusion math (DDPM family) over diffusers schedulers: no Ray, no I/O, no model.

Everything here is model-agnostic: a network enters only as ``eps_fn(x_t, t) -> eps``. The noise
schedules and update rules are diffusers' own (``DDPMScheduler``, ``DDIMScheduler``,
``DPMSolverMultistepScheduler``); this package picks their settings, drives them, and provides the
float64 closed forms (computed the way openai/improved-diffusion computes them) that
``tests/test_diffusion.py`` and ``tests/test_vlb.py`` use to prove the schedulers right against
Ho et al. 2020 ("Denoising Diffusion Probabilistic Models").

- :mod:`.schedule`  the noise schedule, its float64 tables, the forward process, the training loss
- :mod:`.objectives` what the network predicts (epsilon, v, x0, rectified flow) and its loss weights
- :mod:`.sampling`  DDPM / DDIM / DPM-Solver++ sampling and classifier-free guidance
- :mod:`.vlb`       the variational bound (Ho et al. eq. 5) and bits per dimension

Callers use the names re-exported here (``diffusion.sample``, ``diffusion.vlb_terms``).
"""

from pipeline.diffusion.objectives import (
    draw_noise_levels,
    loss_weights,
    model_time,
    noisy_input,
    predicted_eps,
    predicted_x0,
    shift_sigmas,
    target,
)
from pipeline.diffusion.sampling import guided_eps, nfe_per_image, sample
from pipeline.config import DIFFUSION_SAMPLERS, FLOW_SAMPLERS
from pipeline.diffusion.schedule import (
    SAMPLERS,
    TIMESTEP_SPACING,
    add_noise,
    diffusion_loss,
    eps_to_posterior_mean,
    make_scheduler,
    q_mean_variance,
    q_posterior_mean_variance,
    sample_timesteps,
    schedule_tables,
)
from pipeline.diffusion.vlb import (
    REVERSE_VARIANCES,
    bits_per_dim,
    gaussian_log_density,
    normal_kl,
    to_bits_per_dim,
    vlb_terms,
)

__all__ = [
    "DIFFUSION_SAMPLERS",
    "FLOW_SAMPLERS",
    "REVERSE_VARIANCES",
    "SAMPLERS",
    "TIMESTEP_SPACING",
    "add_noise",
    "bits_per_dim",
    "diffusion_loss",
    "draw_noise_levels",
    "loss_weights",
    "model_time",
    "noisy_input",
    "predicted_eps",
    "predicted_x0",
    "shift_sigmas",
    "target",
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
