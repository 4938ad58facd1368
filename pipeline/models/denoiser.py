"""The latent denoiser, built from config (seeded random init) or loaded with a training checkpoint's
EMA weights: a diffusers UNet2DConditionModel (`denoiser.arch: unet`) or a diffusion transformer,
diffusers' PixArtTransformer2DModel (`dit`: adaLN-single timestep conditioning, cross-attention to the
text encoder's hidden states through a caption projection). Both are called through `predict`."""

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


def build_dit(cfg, *, latent_channels: int, latent_size: int, text_dim: int, seed: int):
    """cfg: a DenoiserSection with arch dit (its dit_dims()). The caption projection maps the text width
    to the transformer's (heads x head dim); no size or aspect-ratio conditioning (one resolution)."""
    from diffusers import PixArtTransformer2DModel

    layers, heads, head_dim = cfg.dit_dims()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PixArtTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=latent_channels,
            out_channels=latent_channels,  # no learned variance: the objective's prediction only
            num_layers=layers,
            cross_attention_dim=heads * head_dim,
            caption_channels=text_dim,
            sample_size=latent_size,
            patch_size=cfg.patch_size,
            use_additional_conditions=False,
        )


def build_denoiser_for(cfg, manifest: dict) -> torch.nn.Module:
    """The denoiser of a pipeline Config, sized from the latent dataset's manifest (latent shape, text width)."""
    c, h, _ = manifest["latent_shape"]
    text_dim = manifest["text_shape"][1]
    if cfg.denoiser.arch == "dit":
        return build_dit(cfg.denoiser, latent_channels=c, latent_size=h, text_dim=text_dim, seed=cfg.run.seed)
    return build_denoiser(cfg.denoiser, latent_channels=c, latent_size=h, cross_attention_dim=text_dim, seed=cfg.run.seed)


def predict(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The denoiser's output for latents x at times t (see pipeline.diffusion.sampling.sample), given the
    text embeddings and their mask; `model` may be DDP-wrapped (it is called, not its module), or sharded
    by FSDP2 (which makes its class a subclass of the model's)."""
    from diffusers import PixArtTransformer2DModel

    bare = model.module if hasattr(model, "module") else model
    if isinstance(bare, PixArtTransformer2DModel):
        return model(x, encoder_hidden_states=emb, timestep=t, encoder_attention_mask=mask).sample
    return model(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample


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
