"""The latent denoiser: a diffusers UNet2DConditionModel cross-attending to T5 embeddings."""

from __future__ import annotations

import torch


def build_denoiser(cfg, *, latent_channels: int, latent_size: int, cross_attention_dim: int, seed: int):
    """cfg: a DenoiserSection. Cross-attention sits in the `cross_attention_levels` lowest-resolution
    levels (attention at the highest resolutions costs most and helps least at small sizes)."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    attn = [i >= n - cfg.cross_attention_levels for i in range(n)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn" if cfg.cross_attention_levels else None,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups,
        )
