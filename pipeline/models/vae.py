"""The autoencoder: a diffusers AutoencoderKL from a path/hub id, or a seeded random-init one.

Latents are `scaling_factor * mean(q(z|x))`: the posterior mean rather than a sample, so encoding
is deterministic and re-running encode reproduces the same latent dataset bit for bit.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def build_vae(cfg, seed: int, image_size: int, device: str | torch.device = "cpu"):
    """cfg: a VAESection. Returns (AutoencoderKL, identity dict)."""
    from diffusers import AutoencoderKL

    if cfg.pretrained:
        vae = AutoencoderKL.from_pretrained(cfg.pretrained)
        identity = {"name": cfg.pretrained, "trained": True, "scaling_factor": float(vae.config.scaling_factor)}
        log.info("vae: pretrained %s", cfg.pretrained)
    else:
        n = len(cfg.block_out_channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(cfg.block_out_channels),
                layers_per_block=cfg.layers_per_block,
                latent_channels=cfg.latent_channels,
                norm_num_groups=cfg.norm_num_groups,
                sample_size=image_size,
                scaling_factor=1.0,
            )
        identity = {
            "name": "untrained-vae",
            "trained": False,
            "seed": seed,
            "scaling_factor": 1.0,
            "config": {"block_out_channels": list(cfg.block_out_channels), "latent_channels": cfg.latent_channels,
                       "layers_per_block": cfg.layers_per_block},
        }
        log.warning("vae: UNTRAINED AutoencoderKL (random init, seed %d): no pretrained weights configured", seed)
    vae.requires_grad_(False).eval().to(device)
    return vae, identity


def latent_shape(vae, image_size: int) -> tuple[int, int, int]:
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    return (int(vae.config.latent_channels), image_size // down, image_size // down)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_images(vae, images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 NHWC -> scaled latents [N, C, h, w] (posterior mean)."""
    x = images_to_tensor(images).to(device, dtype=vae.dtype)
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents -> uint8 NHWC."""
    x = vae.decode(latents.to(vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
    return tensor_to_images(x)
