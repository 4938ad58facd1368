"""Evaluation beyond one FID: the variational bound, prompt accuracy, and guidance/sampler sweeps.

Each function is called by the generate job when its `eval.*` setting turns it on, and returns a
plain dict that goes into `eval.json` and the report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter

import numpy as np
import torch

from pipeline import diffusion, storage

log = logging.getLogger(__name__)


def variational_bound(cfg, manifest: dict, checkpoint_uri: str) -> dict:
    """Ho et al.'s bound in bits per latent dimension on held-out (test) latents with the EMA
    denoiser, split into reconstruction, prior-matching and summed denoising-matching terms."""
    from pipeline.data.encode import read_latents
    from pipeline.eval.sample import load_ema_denoiser
    from pipeline.train.step import schedule_config

    n = cfg.eval.vlb_latents
    table = read_latents(cfg.latents_uri(), "test", ["latent", "text_emb", "text_mask"]).slice(0, n)
    shape = manifest["latent_shape"]
    x0 = torch.tensor(np.stack([np.asarray(v, np.float32).reshape(shape) for v in table.column("latent").to_pylist()]))
    emb = torch.tensor(np.stack([np.asarray(v, np.float32) for v in table.column("text_emb").to_pylist()]))
    mask = torch.tensor(np.stack([np.asarray(v, np.int64) for v in table.column("text_mask").to_pylist()]))
    model = load_ema_denoiser(cfg, manifest, checkpoint_uri)

    def eps_fn(x, t):
        with torch.no_grad():
            return model(x.float(), t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample.to(x.dtype)

    t0 = time.time()
    terms = diffusion.vlb_terms(eps_fn, x0, schedule=schedule_config(cfg),
                                timesteps=cfg.eval.vlb_timesteps or "all",
                                generator=torch.Generator().manual_seed(cfg.run.seed), batch_t=1)
    bits = diffusion.bits_per_dim(terms, tuple(x0.shape))
    return {"bits_per_dim": bits, "n_latents": int(len(x0)), "timesteps": cfg.eval.vlb_timesteps or "all",
            "seconds": round(time.time() - t0, 2),
            "note": "continuous latents: the reconstruction term is a density and can be negative"}


def prompt_classifier(cfg):
    """The Fashion-MNIST classifier (trained once on the train split, cached in storage), or None
    when this dataset has none."""
    wanted = cfg.eval.classifier
    if wanted == "no" or (wanted == "auto" and cfg.data.source != "fashion_mnist"):
        return None, None
    from pipeline.eval import classifier as clf

    root = cfg.data.source_dir or None
    size = cfg.data.image_size
    identity = {"dataset": "fashion_mnist", "split": "train", "size": size, "root": root or "default"}
    uri = storage.join(cfg.run.storage, "classifiers", f"fashion_mnist-{size}px.safetensors")
    model, info = clf.load_or_train(
        uri, identity,
        data_fn=lambda: clf.fashion_arrays("train", size=size, root=root)[:2],
        test_fn=lambda: clf.fashion_arrays("test", size=size, root=root)[:2],
    )
    return model, info


def prompt_accuracy(model, images: np.ndarray, prompts: list[str]) -> dict:
    from pipeline.eval import classifier as clf

    out = clf.prompt_accuracy(model, images, prompts)
    out.pop("confusion", None)
    return out


def nearest_caption_accuracy(
    images: np.ndarray, prompts: list[str], ref_images: np.ndarray, ref_captions: list[str], pool: int = 2
) -> dict:
    """Does each generated image look most like a real image of its own prompt? For every image whose
    prompt is one of the reference captions, find the nearest reference image (L2 over pixels after
    `pool` x `pool` average pooling, so a shift of a pixel costs little) and count a hit when its caption
    is the prompt. A retrieval check for datasets that show each caption many times (the demo's emoji
    renders); `chance` is the hit rate of a uniformly random reference image."""
    counts = Counter(ref_captions)
    idx = [i for i, p in enumerate(prompts) if p in counts]
    if not idx:
        return {"n": 0, "accuracy": None, "note": "no prompt is a reference caption"}

    def features(x: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        x = x[:, : h // pool * pool, : w // pool * pool].astype(np.float32) / 255.0
        return x.reshape(n, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4)).reshape(n, -1)

    ref = np.concatenate([features(ref_images[i:i + 512]) for i in range(0, len(ref_images), 512)])
    ref_sq = (ref * ref).sum(1)
    nearest = []
    for start in range(0, len(idx), 256):  # bounded memory: 256 x n_ref distances at a time
        g = features(images[idx[start:start + 256]])
        nearest.extend((ref_sq[None, :] - 2.0 * g @ ref.T).argmin(axis=1).tolist())
    hits = [ref_captions[j] == prompts[i] for i, j in zip(idx, nearest)]
    return {"n": len(idx), "accuracy": float(np.mean(hits)), "n_ref": len(ref_captions),
            "chance": float(np.mean([counts[prompts[i]] / len(ref_captions) for i in idx])),
            "prompt_index": idx, "nearest_captions": [ref_captions[j] for j in nearest]}


def nearest_train_match(cfg, samples: dict[str, tuple[np.ndarray, list[str]]]) -> dict:
    """nearest_caption_accuracy of each named (images, prompts) set against the first
    eval.nearest_match_images training images in shard order (prompts whose caption is not among
    them are left out of `n`)."""
    from pipeline.eval.evaluate import split_records

    ref, captions, _ = split_records(cfg, "train", cfg.eval.nearest_match_images)
    return {name: nearest_caption_accuracy(images, prompts, ref, captions) for name, (images, prompts) in samples.items()}


def seen_prompt_samples(cfg, manifest: dict, checkpoint_uri: str, latents_uri: str) -> dict:
    """eval.seen_prompt_images images from training captions evenly spaced over the split (keys group
    categories, so the first N would be one category): the denoiser on prompts it trained on."""
    from pipeline.eval.sample import generate, load_prompts

    n = cfg.eval.seen_prompt_images
    sub = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, prompts="train", num_images=n))
    captions = load_prompts(sub, latents_uri)
    pick = np.linspace(0, len(captions) - 1, min(n, len(captions))).round().astype(int)
    return generate(sub, manifest, checkpoint_uri, latents_uri, out_name="generate-seen-prompts",
                    prompts=[captions[i] for i in pick])


def sweeps(cfg, manifest: dict, checkpoint_uri: str, latents_uri: str, ref_fid_fn, classifier) -> list[dict]:
    """Guidance sweep (configured sampler) and sampler sweep (configured guidance), each setting on
    eval.sweep_images images scored with the same cached reference statistics (FID at this count is
    biased upward: comparable within the table only)."""
    from pipeline.eval.sample import generate

    settings = [("guidance", cfg.generate.sampler, cfg.generate.steps, g) for g in cfg.eval.sweep_guidance]
    for item in cfg.eval.sweep_samplers:
        name, _, steps = item.partition(":")
        settings.append(("sampler", name, int(steps), cfg.generate.guidance_scale))
    rows, done = [], {}
    for kind, sampler, steps, scale in settings:
        setting = (sampler, steps, float(scale))
        if setting in done:  # e.g. the configured setting is in both sweeps
            rows.append({**done[setting], "sweep": kind, "reused": True})
            continue
        sub = dataclasses.replace(cfg, generate=dataclasses.replace(
            cfg.generate, sampler=sampler, steps=steps, guidance_scale=float(scale), num_images=cfg.eval.sweep_images))
        t0 = time.time()
        gen = generate(sub, manifest, checkpoint_uri, latents_uri,
                       out_name=f"sweep-{sampler}{steps}-g{scale:g}")
        row = {"sweep": kind, "sampler": sampler, "steps": steps, "guidance": scale,
               "nfe_per_image": diffusion.nfe_per_image(sampler, steps, scale),
               "images_per_s": gen["images_per_s"], "n": gen["n"], "latent_std": gen["latent_std"],
               "fid": ref_fid_fn(gen["images"])}
        if classifier is not None:
            row["prompt_accuracy"] = prompt_accuracy(classifier, gen["images"], gen["prompts"])["accuracy"]
        row["seconds"] = round(time.time() - t0, 1)
        log.info("sweep %s", row)
        print(f"sweep: {row}", flush=True)
        rows.append(row)
        done[setting] = row
    return rows
