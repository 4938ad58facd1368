"""Ho et al.'s variational bound of the EMA denoiser on held-out latents, in bits per latent dimension."""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline import diffusion, paths


def variational_bound(cfg, manifest: dict, checkpoint_uri: str) -> dict:
    """The bound on the first eval.vlb_latents test latents, split into reconstruction, prior-matching
    and summed denoising-matching terms. Runs where it is called: the evaluation runs it as a Ray task
    (on a GPU when generate.use_gpu gives one)."""
    from pipeline.data.latents import numpy_column, read_latents
    from pipeline.models.denoiser import load_ema_denoiser, predict

    n = cfg.eval.vlb_latents
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = read_latents(paths.latents(cfg), "test", ["latent", "text_emb", "text_mask"]).slice(0, n)
    text_shape = manifest["text_shape"]
    x0 = torch.from_numpy(numpy_column(table, "latent", manifest["latent_shape"], np.float32))
    emb = torch.from_numpy(numpy_column(table, "text_emb", text_shape, np.float32)).to(device)
    mask = torch.from_numpy(numpy_column(table, "text_mask", text_shape[:1], np.int64)).to(device)
    model = load_ema_denoiser(cfg, manifest, checkpoint_uri, device)

    def fn(x, t):  # the prediction the model was trained for (vlb_terms reads schedule.prediction)
        with torch.no_grad():
            return predict(model, x.float().to(device), t.to(device), emb, mask).to("cpu", x.dtype)

    t0 = time.time()
    terms = diffusion.vlb_terms(fn, x0, schedule=cfg.schedule,
                                timesteps=cfg.eval.vlb_timesteps or "all",
                                generator=torch.Generator().manual_seed(cfg.run.seed), batch_t=1)
    bits = diffusion.bits_per_dim(terms, tuple(x0.shape))
    return {"bits_per_dim": bits, "n_latents": int(len(x0)), "timesteps": cfg.eval.vlb_timesteps or "all",
            "seconds": round(time.time() - t0, 2),
            "note": "continuous latents: the reconstruction term is a density and can be negative"}
