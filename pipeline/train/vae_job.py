"""The autoencoder stage end to end: Ray Train fit, then scale, evaluate and export."""

from __future__ import annotations

import time

from pipeline import paths
from pipeline.train.trainer import fit
from pipeline.models.vae import load_trained_vae
from pipeline.train.vae_export import evaluate_vae, export_vae, latent_std


def train_vae(cfg) -> dict:
    from pipeline.data.readers import split_images

    t0 = time.time()
    trained = fit(cfg, task="vae")
    checkpoint = trained["checkpoint"]  # fit already chose (downloaded and verified) it
    vae = load_trained_vae(cfg, checkpoint)
    train_images = split_images(cfg, "train", cfg.vae_train.scale_images)
    std = latent_std(vae, train_images)
    test_images = split_images(cfg, "test", cfg.vae_train.eval_images)
    held_out = evaluate_vae(vae, test_images)
    info = export_vae(vae, paths.vae_export(cfg), 1.0 / std, {
        "test_psnr": held_out["psnr"], "test_kl_per_dim": held_out["kl_per_dim"], "test_images": held_out["n"],
        "latent_std": std, "steps": trained["steps"], "checkpoint": checkpoint, "beta": cfg.vae_train.beta,
    })
    info["seconds"] = round(time.time() - t0, 2)
    print(f"train_vae: held-out PSNR {held_out['psnr']:.2f} dB, KL/dim {held_out['kl_per_dim']:.4f}, "
          f"scaling factor {info['scaling_factor']:.4f} -> {paths.vae_export(cfg)}")
    return info
