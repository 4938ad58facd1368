"""The autoencoder's ELBO step, its latent scale and its diffusers export (no Ray)."""

import os

import numpy as np
import pytest
import torch

from pipeline import config, paths, storage
from pipeline.models.vae import build_vae, encode_images
from pipeline.train.vae_export import evaluate_vae, export_vae, latent_std
from pipeline.train.vae_step import build_vae_train_state, psnr_from_mse, vae_losses, vae_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(*overrides):
    return config.load(os.path.join(ROOT, "configs", "tiny.yaml"), ["vae.source=trained", *overrides])


def _images(n=16, size=16, seed=0):
    """Smooth coloured blobs: learnable structure, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7, 3) * [1, 1, 0.5]
        color = rng.integers(0, 256, 3)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2)[..., None]
        out.append(np.where(mask, color, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_kl_term_is_the_closed_form_kl_to_the_standard_normal():
    cfg = _cfg()
    vae, _ = build_vae(cfg.vae, 0, 16, trainable=True, force_random=True)
    x = torch.from_numpy(_images(4)).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = vae_losses(vae, x, torch.Generator().manual_seed(0))
    post = vae.encode(x).latent_dist
    q = torch.distributions.Normal(post.mean, post.std)
    p = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1) / x[0].numel()
    torch.testing.assert_close(out["kl"], expected, rtol=1e-4, atol=1e-6)
    assert out["recon"].shape == x.shape


def test_elbo_steps_improve_reconstruction():
    cfg = _cfg("vae_train.lr=3e-3", "vae_train.warmup_steps=0")
    state = build_vae_train_state(cfg)
    batch = {"image": torch.from_numpy(_images(16))}
    first = vae_train_step(state, batch, cfg)
    for _ in range(30):
        last = vae_train_step(state, batch, cfg)
    assert state.step == 31
    assert last["scalars"]["rec"] < 0.5 * first["scalars"]["rec"]
    assert last["scalars"]["psnr"] > first["scalars"]["psnr"] + 3


def test_psnr_from_mse():
    assert psnr_from_mse(4 * 0.01) == pytest.approx(20.0)  # MSE 0.01 on [0, 1] is 20 dB
    assert psnr_from_mse(4 * 0.0001) == pytest.approx(40.0)


def test_export_round_trip_sets_the_measured_scaling_factor(tmp_path):
    cfg = _cfg(f"run.storage={tmp_path}")
    vae, _ = build_vae(cfg.vae, 0, 16, trainable=True, force_random=True)
    vae.eval()
    images = _images(32)
    std = latent_std(vae, images)
    metrics = evaluate_vae(vae, images)
    assert 0 < metrics["psnr"] < 60 and metrics["n"] == 32
    with pytest.raises(FileNotFoundError, match="train_vae"):
        build_vae(cfg.vae, 0, 16, export_uri=paths.vae_export(cfg))
    uri_before = paths.latents(cfg)
    info = export_vae(vae, paths.vae_export(cfg), 1.0 / std, {"test_psnr": metrics["psnr"]})
    assert storage.is_committed(paths.vae_export(cfg))
    loaded, identity = build_vae(cfg.vae, 0, 16, export_uri=paths.vae_export(cfg))
    assert identity["trained"] is True and identity["sha256"] == info["sha256"]
    assert loaded.config.scaling_factor == pytest.approx(1.0 / std)
    z = encode_images(loaded, images)
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3)  # scaled latents have unit std on that sample
    # The latent dataset's location follows the exported weights, so retraining never reuses stale latents.
    assert paths.latents(cfg) != uri_before


def test_a_tampered_export_is_refused(tmp_path):
    """Bytes of the exported weights changed at equal size: the file still loads as safetensors (the
    fault would pass unnoticed), but the hash in _COMMITTED refuses it."""
    from safetensors.torch import load_file

    cfg = _cfg(f"run.storage={tmp_path}")
    vae, _ = build_vae(cfg.vae, 0, 16, trainable=True, force_random=True)
    export_vae(vae.eval(), paths.vae_export(cfg), 1.0, {})
    weights = os.path.join(paths.vae_export(cfg), "diffusion_pytorch_model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-64:] = bytes(b ^ 0x55 for b in data[-64:])  # inside the last tensor's values
    with open(weights, "wb") as f:
        f.write(bytes(data))
    load_file(weights)  # still a valid safetensors file
    with pytest.raises(storage.CorruptArtifact, match="do not match the sha256"):
        build_vae(cfg.vae, 0, 16, export_uri=paths.vae_export(cfg))
