"""Training the autoencoder: the VAE's ELBO, one optimizer step, plain PyTorch (no Ray).

loss = reconstruction + beta * KL(q(z|x) || N(0, I)), both per pixel dimension:
- reconstruction: mean squared error on pixels in [-1, 1], the negative log-likelihood of a Gaussian
  decoder with fixed variance up to a constant and a scale that `beta` absorbs;
- KL: the closed-form KL of the diagonal Gaussian posterior to the standard normal prior, summed over
  latent dimensions and divided by the number of pixel dimensions.
beta = 1 with a decoder variance of 1/2 would be the exact ELBO; small betas (LDM uses ~1e-6 on sums)
trade a less Gaussian latent for sharper reconstructions.
"""

from __future__ import annotations

import math

import torch

from pipeline.train.step import TrainState


class VAEWithLoss(torch.nn.Module):
    """The VAE with its ELBO terms as forward(), so DDP sees (and all-reduces) the whole computation."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise_seed: int) -> dict:
        return vae_losses(self.vae, x, torch.Generator().manual_seed(noise_seed))


def build_vae_train_state(cfg, *, rank: int = 0, wrap=None) -> TrainState:
    from diffusers.optimization import get_scheduler

    from pipeline.models.vae import build_vae

    vae, _ = build_vae(cfg.vae, cfg.run.seed, cfg.data.image_size, trainable=True, force_random=True)
    model = VAEWithLoss(vae)
    model = wrap(model) if wrap is not None else model
    t = cfg.vae_train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=t.warmup_steps)
    return TrainState(model=model, ema=None, optimizer=optimizer, lr_scheduler=lr_scheduler,
                      generator=torch.Generator(), seed=cfg.run.seed, rank=rank)


def vae_losses(vae, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """Per-sample reconstruction MSE and KL per pixel dimension, and the reconstruction itself."""
    posterior = vae.encode(x).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    z = posterior.mean + posterior.std * noise  # reparameterised sample of q(z|x)
    recon = vae.decode(z).sample
    dims = x[0].numel()
    rec = ((recon.float() - x.float()) ** 2).flatten(1).mean(1)
    kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).flatten(1).sum(1) / dims
    return {"rec": rec, "kl": kl, "recon": recon}


def vae_train_step(state: TrainState, batch: dict, cfg, *, autocast_dtype=None) -> dict:
    from pipeline.models.vae import images_to_tensor
    from pipeline.train.step import apply_update, step_seed

    device = next(state.model.parameters()).device
    images = batch["image"]
    x = images_to_tensor(images.numpy() if hasattr(images, "numpy") else images).to(device)
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = state.model(x, step_seed(state.seed, state.rank, state.step))
    rec, kl = out["rec"].mean(), out["kl"].mean()
    loss = rec + cfg.vae_train.beta * kl
    grad_norm, applied = apply_update(state, loss, cfg.vae_train.grad_clip)
    return {"loss": loss.item(), "grad_norm": grad_norm, "applied": applied,
            "scalars": {"rec": rec.item(), "kl": kl.item(), "psnr": psnr_from_mse(rec.item())},
            "n": len(x)}


def psnr_from_mse(mse_minus1_to_1: float) -> float:
    """PSNR in dB for images in [0, 1], from an MSE measured on [-1, 1] (4x larger)."""
    mse01 = max(mse_minus1_to_1 / 4.0, 1e-12)
    return 10.0 * math.log10(1.0 / mse01)
