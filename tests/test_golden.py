"""Golden values for configs/tiny.yaml, checked in (tests/golden/tiny.json), as torchtitan and diffusers
keep them: the first 10 training losses, slices of the denoiser's and the VAE's outputs for a fixed
input, and each sampler's output for a fixed seed. All on CPU, one thread, seeded random-init models.

A change that moves them (a model, the schedule, the loop, a library upgrade) must say why in its
commit, after regenerating them:

    HF_HUB_OFFLINE=1 .venv/bin/python tests/test_golden.py --update
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pipeline import config, diffusion  # noqa: E402

GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny.json")
MANIFEST = {"latent_shape": [4, 8, 8], "text_shape": [16, 32]}
SLICE = 8  # values kept per output: the first SLICE of the flattened tensor, and its mean


def _cfg():
    return config.load(os.path.join(ROOT, "configs", "tiny.yaml"),
                       ["train.steps=10", "train.report_every=1", "train.checkpoint_every=100"])


def _summary(x: torch.Tensor) -> dict:
    x = x.detach().double().flatten()
    return {"first": x[:SLICE].tolist(), "mean": float(x.mean()), "abs_mean": float(x.abs().mean())}


def compute() -> dict:
    """Every golden value, from scratch."""
    import tempfile

    from pipeline.models.vae import build_vae_for, encode_images
    from pipeline.train.loop import train_locally
    from pipeline.models.denoiser import build_denoiser_for

    torch.set_num_threads(1)
    cfg = _cfg()
    g = torch.Generator().manual_seed(2024)
    n, (length, dim) = 32, MANIFEST["text_shape"]
    data = {"latent": torch.randn(n, *MANIFEST["latent_shape"], generator=g),
            "text_emb": torch.randn(n, length, dim, generator=g),
            "text_mask": torch.ones(n, length, dtype=torch.int64)}
    null = (torch.zeros(length, dim), torch.ones(length, dtype=torch.int64))
    with tempfile.TemporaryDirectory() as tmp:
        reports = train_locally(cfg, MANIFEST, *null, data, tmp)
    out = {"train_losses": [float(r["loss"]) for r in reports]}

    model = build_denoiser_for(cfg, MANIFEST).eval()
    x, t = data["latent"][:2], torch.tensor([10, 500])
    emb, mask = data["text_emb"][:2], data["text_mask"][:2]
    with torch.no_grad():
        out["denoiser"] = _summary(model(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample)

    vae, _ = build_vae_for(config.load(os.path.join(ROOT, "configs", "tiny.yaml"), ["vae.source=random"]))
    images = torch.randint(0, 256, (2, 16, 16, 3), generator=g, dtype=torch.uint8).numpy()
    with torch.no_grad():
        latents = encode_images(vae, images)
        out["vae_latents"] = _summary(latents)
        out["vae_decoded"] = _summary(vae.decode(latents / vae.config.scaling_factor).sample)

    def eps(xt, tt):
        return model(xt, tt, encoder_hidden_states=emb, encoder_attention_mask=mask).sample

    for sampler in diffusion.DIFFUSION_SAMPLERS:
        sample = diffusion.sample(eps, (2, *MANIFEST["latent_shape"]), sampler=sampler, steps=4, seed=[7, 8],
                                  schedule=cfg.schedule)
        out[f"sample_{sampler}"] = _summary(sample)
    return out


@pytest.fixture(scope="module")
def values() -> dict:
    n = torch.get_num_threads()
    try:
        return compute()
    finally:
        torch.set_num_threads(n)


def _golden() -> dict:
    with open(GOLDEN) as f:
        return json.load(f)


HINT = "the golden values moved: if that is intended, regenerate them (tests/test_golden.py --update) and say why"


def test_training_losses_match_golden(values):
    # Ten optimizer steps compound float rounding: a CPU with other vector units may differ in the 6th digit.
    assert values["train_losses"] == pytest.approx(_golden()["train_losses"], rel=1e-4), HINT


@pytest.mark.parametrize("name", ["denoiser", "vae_latents", "vae_decoded"] + [f"sample_{s}" for s in ("ddpm", "ddim", "dpm")])
def test_model_and_sampler_outputs_match_golden(values, name):
    got, want = values[name], _golden()[name]
    assert got["first"] == pytest.approx(want["first"], rel=1e-4, abs=1e-6), HINT
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-4, abs=1e-7), HINT
    assert got["abs_mean"] == pytest.approx(want["abs_mean"], rel=1e-4), HINT
    assert np.isfinite(got["first"]).all() and got["abs_mean"] > 0  # not a degenerate (all-zero) output


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        raise SystemExit(__doc__)
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump(compute(), f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {GOLDEN}")
