"""report.md for a run: samples per prompt, VAE reconstructions, loss curves, tables, config, versions."""

from __future__ import annotations

import numpy as np

from pipeline import paths, storage
from pipeline.eval.report import render as rp


def _history(cfg, task: str) -> list[dict]:
    uri = storage.join(paths.outputs(cfg), f"{task}_metrics.json")
    return storage.read_json(uri) if storage.exists(uri) else []


def _curve(history: list[dict], key: str) -> list[tuple[float, float]]:
    return [(m["step"], m[key]) for m in history if key in m and m[key] is not None]


def _reconstructions(cfg, n: int = 16) -> np.ndarray | None:
    from pipeline.data.readers import split_images
    from pipeline.models.vae import build_vae_for, decode_latents, encode_images

    try:
        vae, _ = build_vae_for(cfg)
    except FileNotFoundError:
        return None
    images = split_images(cfg, "test", n)
    return rp.side_by_side(images, decode_latents(vae, encode_images(vae, images)), n=n, scale=2)


def build_report(cfg, gen: dict, stages: dict | None = None, out_uris: tuple[str, ...] = ()) -> list[str]:
    """Writes report.md (+ PNGs) to `<outputs>/report` and to each of `out_uris`; returns their URIs."""
    fid = gen.get("fid") or {}
    ev = gen.get("eval") or {}
    vae_info = {}
    metrics_uri = storage.join(paths.vae_export(cfg), "metrics.json")
    if cfg.vae.source == "trained" and storage.exists(metrics_uri):
        vae_info = storage.read_json(metrics_uri)
    headline = {
        "FID": fid.get("fid"), "FID n_gen": fid.get("n_gen"), "FID n_ref": fid.get("n_ref"),
        "VAE test PSNR (dB)": vae_info.get("test_psnr"), "VAE test KL/dim": vae_info.get("test_kl_per_dim"),
        "prompt accuracy": (ev.get("prompt_accuracy") or {}).get("accuracy"),
        "bound (bits/latent dim)": ((ev.get("vlb") or {}).get("bits_per_dim") or {}).get("total"),
        "sampler": f"{gen['sampler']} x{gen['steps']}, guidance {gen['guidance_scale']}",
        "images/s": gen.get("images_per_s"),
    }
    for name, label in (("samples", "samples"), ("seen_prompts", "training-prompt samples")):
        match = (ev.get("nearest_match") or {}).get(name) or {}
        if match.get("n"):
            headline[f"nearest training image has the prompt, {label}"] = (
                f"{match['accuracy']:.1%} of {match['n']} (chance {match['chance']:.1%})")
    untrained = [k for k in ("text_encoder", "vae") if not gen.get("encoders", {}).get(k, {}).get("trained", True)]
    sections: list[dict] = [{
        "heading": "Summary",
        "text": fid.get("note", "") + ("\n\n**Untrained encoders**: " + ", ".join(untrained) if untrained else ""),
        "table": [{"metric": k, "value": v} for k, v in headline.items() if v is not None],
    }]
    from pipeline.eval.generate import read_images

    pick = rp.spread_pick(gen["prompts"], 48)
    held_out = " (held-out: the test split's captions)" if cfg.generate.prompts == "test" else ""
    sections.append({"heading": "Samples", "text": f"{len(pick)} of the {gen['n']} generated images, one per "
                     f"distinct prompt where there are enough, spread over the run, each under its prompt{held_out}; "
                     "seed derived from its index.",
                     "images": [("samples", rp.captioned_grid(read_images(gen["uri"], pick),
                                                              [gen["prompts"][i] for i in pick], ncols=8, scale=2),
                                 "generated images and their prompts")]})
    seen = gen.get("seen_prompts")
    if seen:
        seen_grid = rp.captioned_grid(read_images(seen["uri"], range(min(48, seen["n"]))), seen["prompts"][:48],
                                      ncols=8, scale=2)
        sections.append({"heading": "Samples for training prompts",
                         "text": f"{seen['n']} images from training captions spread over the train split: prompts "
                                 "the denoiser saw, so these show what it learnt rather than how it generalises.",
                         "images": [("samples_seen_prompts", seen_grid, "generated images for training captions")]})
    recon = _reconstructions(cfg)
    if recon is not None:
        sections.append({"heading": "VAE reconstructions", "text": "Test images (top rows) and their reconstructions.",
                         "images": [("vae_reconstructions", recon, "inputs above, reconstructions below")]})
    curves = []
    den = _history(cfg, "denoiser")
    if den:
        series = {k: _curve(den, k) for k in ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3")}
        curves.append(("denoiser_loss", rp.line_chart(series, title="denoiser loss (q: timestep quartile)",
                                                      xlabel="step", ylabel="MSE on noise", log_y=True),
                       "denoiser loss, overall and by timestep quartile"))
    vae_hist = _history(cfg, "vae")
    if vae_hist:
        curves.append(("vae_loss", rp.line_chart({"rec": _curve(vae_hist, "rec"), "kl": _curve(vae_hist, "kl")},
                                                 title="VAE loss terms", xlabel="step", ylabel="per pixel dim",
                                                 log_y=True), "VAE reconstruction MSE and KL"))
        curves.append(("vae_psnr", rp.line_chart({"train psnr": _curve(vae_hist, "psnr")}, title="VAE PSNR",
                                                 xlabel="step", ylabel="dB"), "VAE training PSNR"))
    if curves:
        sections.append({"heading": "Training curves", "images": curves})
    if ev.get("sweeps"):
        sections.append({"heading": "Guidance and sampler sweeps",
                         "text": f"{ev['sweeps'][0]['n']} images per setting against the same cached test "
                                 "statistics: FID at this count is biased upward, comparable within the table.",
                         "table": ev["sweeps"]})
    if ev.get("prompt_accuracy"):
        per = ev["prompt_accuracy"]["per_class"]
        sections.append({"heading": "Prompt accuracy by class",
                         "table": [{"class": k, "accuracy": v} for k, v in per.items()]})
    if ev.get("vlb"):
        sections.append({"heading": "Variational bound (bits per latent dimension)",
                         "text": ev["vlb"]["note"], "table": [ev["vlb"]["bits_per_dim"]]})
    if stages:
        sections.append({"heading": "Seconds per stage", "table": [stages]})
    sections.append({"heading": "Config", "text": rp.config_block(cfg.to_dict())})
    sections.append({"heading": "Versions", "table": [rp.versions()]})
    title = f"ray-latent-diffusion run `{cfg.run.name}` ({cfg.data.source}, {cfg.data.image_size} px)"
    targets = [storage.join(paths.outputs(cfg), "report"), *out_uris]
    return [rp.write_report(uri, title=title, sections=sections) for uri in targets]
