"""Stage 4+5: generate images from prompts with Ray Data, then evaluate: FID against the test split,
and as configured the variational bound, prompt accuracy, guidance/sampler sweeps and report.md.

    python -m jobs.generate --config configs/tiny.yaml [generate.sampler=dpm generate.steps=20 ...]
"""

from pipeline import cli, storage
from pipeline.data.encode import load_manifest
from pipeline.eval.evaluate import compute_fid
from pipeline.eval.sample import generate
from pipeline.train.trainer import latest_checkpoint_uri


def evaluate(cfg, manifest: dict, checkpoint: str, out: dict) -> dict:
    """Everything beyond the main FID; written to <outputs>/generate/eval.json. The seen-prompt samples'
    images go into out["seen_prompts"] for the report."""
    from pipeline.eval import extras
    from pipeline.eval.evaluate import reference_stats
    from pipeline.eval.fid import fid_from_images

    ev: dict = {}
    if cfg.eval.vlb_latents:
        ev["vlb"] = extras.variational_bound(cfg, manifest, checkpoint)
        print(f"eval: variational bound {ev['vlb']['bits_per_dim']} bits/dim")
    classifier, info = extras.prompt_classifier(cfg)
    if classifier is not None:
        ev["classifier"] = {"test_accuracy": (info.get("test") or {}).get("accuracy"), "cached": info["cached"],
                            "uri": info["uri"]}
        ev["prompt_accuracy"] = extras.prompt_accuracy(classifier, out["images"], out["prompts"])
        print(f"eval: prompt accuracy {ev['prompt_accuracy']['accuracy']:.3f} "
              f"(classifier test accuracy {ev['classifier']['test_accuracy']})")
    if cfg.eval.seen_prompt_images:
        out["seen_prompts"] = extras.seen_prompt_samples(cfg, manifest, checkpoint, cfg.latents_uri())
        ev["seen_prompts"] = {k: out["seen_prompts"][k] for k in ("n", "uri", "images_per_s", "latent_std")}
    if cfg.eval.nearest_match_images:
        sets = {"samples": (out["images"], out["prompts"])}
        if out.get("seen_prompts"):
            sets["seen_prompts"] = (out["seen_prompts"]["images"], out["seen_prompts"]["prompts"])
        ev["nearest_match"] = extras.nearest_train_match(cfg, sets)
        for name, m in ev["nearest_match"].items():
            if m["n"]:
                print(f"eval: nearest training image has the prompt's caption for {m['accuracy']:.3f} of {m['n']} "
                      f"{name} (chance {m['chance']:.3f})")
    if cfg.eval.sweep_images:
        ref, _, _ = reference_stats(cfg)
        ev["sweeps"] = extras.sweeps(cfg, manifest, checkpoint, cfg.latents_uri(),
                                     lambda imgs: fid_from_images(imgs, ref, batch_size=cfg.fid.batch_size)[0],
                                     classifier)
    storage.write_json(storage.join(cfg.outputs_uri(), "generate", "eval.json"), ev)
    return ev


def run(cfg, report: bool = True) -> dict:
    manifest = load_manifest(cfg.latents_uri())
    checkpoint = latest_checkpoint_uri(cfg)
    if checkpoint is None:
        raise SystemExit(f"no complete checkpoint for run {cfg.run.name!r}: run `python -m jobs.train` first")
    out = generate(cfg, manifest, checkpoint, cfg.latents_uri())
    if cfg.fid.enabled:
        out["fid"] = compute_fid(cfg, out["images"], storage.join(cfg.outputs_uri(), "generate"))
    out["eval"] = evaluate(cfg, manifest, checkpoint, out)
    out["encoders"] = {"text_encoder": manifest["text_encoder"], "vae": manifest["vae"]}
    if report and cfg.eval.report:
        from pipeline.eval.run_report import build_report

        out["report"] = build_report(cfg, out)
        print(f"report: {out['report'][0]}")
    return out


def main(argv=None) -> dict:
    cfg, args = cli.parse(__doc__, argv)
    cli.setup_logging()
    with cli.ray_session(args.ray_address):
        return run(cfg)


if __name__ == "__main__":
    main()
