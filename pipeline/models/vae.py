"""The autoencoder: a diffusers AutoencoderKL from a path/hub id, a verified export of our own
training, the weights of a training checkpoint, or a seeded random-init one.

Latents are `scaling_factor * mean(q(z|x))`: the posterior mean rather than a sample, so encoding
is deterministic and re-running encode reproduces the same latent dataset bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import numpy as np
import torch

from pipeline import checkpoint_store, paths, storage

log = logging.getLogger(__name__)


def build_vae(cfg, seed: int, image_size: int, device: str | torch.device = "cpu", *,
              trainable: bool = False, force_random: bool = False, export_uri: str = ""):
    """cfg: a VAESection. Returns (AutoencoderKL, identity dict).

    `vae.source`: random (seeded init, untrained), pretrained (`vae.pretrained`: a folder, s3:// URI
    or hub id), trained (the folder `jobs.train_vae` exported to `export_uri`). `force_random` builds
    the architecture only (to load training checkpoints into); `trainable` leaves it in train mode."""
    from diffusers import AutoencoderKL

    source = "random" if force_random else cfg.source
    if source in ("pretrained", "trained"):
        where = cfg.pretrained if source == "pretrained" else export_uri
        if source == "trained" and not (export_uri and storage.is_committed(export_uri)):
            raise FileNotFoundError(
                f"vae.source is 'trained' but no committed VAE export at {export_uri!r}: run `python -m jobs.train_vae` first"
            )
        vae = _from_pretrained(AutoencoderKL, where, verified_export=source == "trained")
        identity = {"name": where, "trained": True, "source": source,
                    "scaling_factor": float(vae.config.scaling_factor)}
        if source == "trained":
            identity["sha256"] = storage.read_json(storage.join(export_uri, storage.COMMIT_MARKER)).get("sha256")
        log.info("vae: %s %s (scaling factor %.4f)", source, where, vae.config.scaling_factor)
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
            "source": "random",
            "seed": seed,
            "scaling_factor": 1.0,
            "config": {"block_out_channels": list(cfg.block_out_channels), "latent_channels": cfg.latent_channels,
                       "layers_per_block": cfg.layers_per_block},
        }
        if not trainable:
            log.warning("vae: UNTRAINED AutoencoderKL (random init, seed %d): no trained weights configured", seed)
    if trainable:
        vae.train().to(device)
    else:
        vae.requires_grad_(False).eval().to(device)
    return vae, identity


def build_vae_for(cfg, device: str | torch.device = "cpu"):
    """The frozen VAE a pipeline Config asks for (cfg: Config)."""
    return build_vae(cfg.vae, cfg.run.seed, cfg.data.image_size, device, export_uri=paths.vae_export(cfg))


def _from_pretrained(cls, where: str, verified_export: bool = False):
    """from_pretrained of safetensors weights only (a pickled .bin is never loaded), for local
    folders and hub ids; object-store folders are copied locally first. A trained export is checked
    against the hash in its _COMMITTED (fetch_export)."""
    with tempfile.TemporaryDirectory(prefix="rld-vae-") as local:
        if verified_export:
            where = fetch_export(where, local)
        elif storage.is_remote(where):
            fs, path = storage.fs_and_path(where)
            for name in fs.ls(path, detail=False):
                base = name.rstrip("/").rsplit("/", 1)[-1]
                if base.endswith(".json") or base.endswith(".safetensors"):
                    fs.get(name, f"{local}/{base}")
            where = local
        return cls.from_pretrained(where, use_safetensors=True)


def load_trained_vae(cfg, checkpoint_uri: str):
    """The AutoencoderKL with the weights of a VAE training checkpoint (verified on download)."""
    vae, _ = build_vae(cfg.vae, cfg.run.seed, cfg.data.image_size, trainable=True, force_random=True)
    with tempfile.TemporaryDirectory() as tmp:
        sd, _ = checkpoint_store.fetch(checkpoint_uri, tmp)
    vae.load_state_dict({k.removeprefix("vae."): v for k, v in sd["model"].items()})
    return vae.eval().requires_grad_(False)


EXPORT_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
"""What save_pretrained writes, for exports whose marker predates its `files` list."""


def export_digest(folder: str, names: list[str]) -> str:
    """The export's identity and integrity check: sha256 over (name + bytes) of each file, sorted by
    name, first 16 hex digits (recorded in `_COMMITTED`; the latents key depends on it)."""
    digest = hashlib.sha256()
    for name in sorted(names):
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def fetch_export(export_uri: str, local: str) -> str:
    """Download a committed VAE export's files into `local` and verify them against `_COMMITTED`;
    storage.CorruptArtifact if they differ. Returns `local`."""
    marker = storage.read_json(storage.join(export_uri, storage.COMMIT_MARKER))
    names = marker.get("files") or EXPORT_FILES
    if any("/" in n or n.startswith(".") or not n.endswith((".json", ".safetensors")) for n in names):
        raise storage.CorruptArtifact(f"{export_uri}: _COMMITTED lists unexpected files {names}")
    for name in names:
        fs, path = storage.fs_and_path(storage.join(export_uri, name))
        fs.get(path, os.path.join(local, name))
    if export_digest(local, names) != marker.get("sha256"):
        raise storage.CorruptArtifact(
            f"{export_uri}: the exported VAE's files do not match the sha256 in its _COMMITTED (corrupted or "
            "replaced); run `python -m jobs.train_vae` again to re-export"
        )
    return local


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
