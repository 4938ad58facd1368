"""After VAE training: measure the latent scale, evaluate held-out PSNR and KL, export a diffusers folder.

The export is what `encode` loads (`vae.source: trained`): `AutoencoderKL.save_pretrained` output
with `scaling_factor` = 1 / std of the latents over a sample of training images (how Stable
Diffusion's 0.18215 was set), so scaled latents have unit variance as the DDPM prior assumes.
The folder is uploaded first and `_COMMITTED` (with the weights' hash) written last; reading it back
(verified) is pipeline.models.vae's.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from pipeline import storage
from pipeline.models.vae import export_digest


@torch.no_grad()
def latent_std(vae, images: np.ndarray, batch_size: int = 128) -> float:
    """Std of unscaled posterior means over `images` (uint8 NHWC)."""
    from pipeline.models.vae import images_to_tensor

    zs = [vae.encode(images_to_tensor(images[i:i + batch_size])).latent_dist.mean
          for i in range(0, len(images), batch_size)]
    return float(torch.cat(zs).float().std())


@torch.no_grad()
def evaluate_vae(vae, images: np.ndarray, batch_size: int = 128) -> dict:
    """Held-out reconstruction (posterior mean through the decoder) PSNR in dB and KL per pixel dim."""
    from pipeline.models.vae import images_to_tensor
    from pipeline.train.vae_step import psnr_from_mse

    se, kl, n = 0.0, 0.0, 0
    for i in range(0, len(images), batch_size):
        x = images_to_tensor(images[i:i + batch_size])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.mean).sample.clamp(-1, 1)
        dims = x[0].numel()
        se += float(((recon - x) ** 2).flatten(1).mean(1).sum())
        kl += float((0.5 * (post.mean ** 2 + post.var - 1.0 - post.logvar)).flatten(1).sum(1).sum() / dims)
        n += len(x)
    mse = se / n
    # PSNR per image then averaged is the usual report; the pooled MSE gives a close, slightly lower value.
    return {"psnr": psnr_from_mse(mse), "mse": mse, "kl_per_dim": kl / n, "n": n}


def export_vae(vae, out_uri: str, scaling_factor: float, metrics: dict) -> dict:
    """save_pretrained with the measured scaling factor, upload, then _COMMITTED with the hash."""
    vae.register_to_config(scaling_factor=float(scaling_factor))
    with tempfile.TemporaryDirectory() as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        names = sorted(os.listdir(tmp))
        for name in names:
            storage.upload_file(os.path.join(tmp, name), storage.join(out_uri, name))
        digest = export_digest(tmp, names)
    info = {"sha256": digest, "files": names, "scaling_factor": float(scaling_factor), **metrics}
    storage.write_json(storage.join(out_uri, "metrics.json"), info)
    storage.write_commit_marker(out_uri, info)
    return info
