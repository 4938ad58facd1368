"""The latent denoiser: a diffusers UNet2DConditionModel cross-attending to T5 embeddings, built from
config (seeded random init) or loaded with a training checkpoint's EMA weights."""

from __future__ import annotations

import tempfile

import torch

from pipeline import checkpoint_store


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


def build_denoiser_for(cfg, manifest: dict) -> torch.nn.Module:
    """The denoiser of a pipeline Config, sized from the latent dataset's manifest (latent shape, text width)."""
    c, h, _ = manifest["latent_shape"]
    return build_denoiser(
        cfg.denoiser, latent_channels=c, latent_size=h, cross_attention_dim=manifest["text_shape"][1], seed=cfg.run.seed
    )


def load_ema_denoiser(cfg, manifest: dict, checkpoint_uri: str, device="cpu") -> torch.nn.Module:
    """The denoiser with a stored training checkpoint's EMA weights (verified on download), in eval mode."""
    from diffusers.training_utils import EMAModel

    with tempfile.TemporaryDirectory() as tmp:
        sd, _ = checkpoint_store.fetch(checkpoint_uri, tmp)  # verified here: these are the bytes this process loads
    model = build_denoiser_for(cfg, manifest)
    model.load_state_dict(sd["model"])
    ema = EMAModel(model.parameters())
    ema.load_state_dict(sd["ema"])
    ema.copy_to(model.parameters())
    return model.requires_grad_(False).eval().to(device)
