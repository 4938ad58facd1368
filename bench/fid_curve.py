"""FID against training time: every kept denoiser checkpoint of a finished run, each sampled with the
configured sampler and guidance and scored on the same cached test statistics. Each point's sample
grid is written to RUN_DIR/curve/<run.name>-step<N>.png.

    .venv/bin/python bench/fid_curve.py --run-dir runs/fashion [--images 1000] [--steps 3000,7000] [key=value ...]

It answers "would more training help?": a curve still falling at the last checkpoint says the
budget, not the model, limits the FID. Uses the run's local S3 and Ray (started and stopped here);
the config defaults to configs/fashion_mnist.yaml and must be the one the run was trained with.
Where the run has a prompt classifier (cached by its evaluation), each point also gets prompt accuracy.
FID on 1,000 images is biased upward: compare the rows with each other, not with FID-5k.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _args(p) -> None:
    p.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "fashion"))
    p.add_argument("--images", type=int, default=1000, help="generated images per checkpoint")
    p.add_argument("--steps", default="", help="comma-separated checkpoint steps to score (default: all kept)")


def score_checkpoints(cfg, run_dir: str, images: int, steps: set[int] | None = None) -> list[dict]:
    """FID (and prompt accuracy, where the dataset has a classifier) of each complete checkpoint of
    cfg's run, `images` generated each with the configured sampler; needs a connected Ray driver.
    Each point's grid goes to RUN_DIR/curve/<run.name>-step<N>.png."""
    from pipeline import paths
    from pipeline.data.latents import load_manifest
    from pipeline.eval import scoring
    from pipeline.eval.fid import fid_of_moments
    from pipeline.eval.generate import generate
    from pipeline.train.trainer import complete_checkpoints

    sub = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, num_images=images))
    manifest = load_manifest(paths.latents(cfg))
    ref, _, _ = scoring.reference_stats(cfg)
    classify = scoring.prompt_classifier(cfg)[0] is not None  # trained (or cached) before the actors load it
    rows = []
    for step, checkpoint in complete_checkpoints(cfg):
        if steps and step not in steps:
            continue
        t0 = time.time()
        gen = generate(sub, manifest, checkpoint, paths.latents(cfg), out_name=f"curve-step{step}")
        chunks = scoring.image_chunks("curve", gen["uri"], gen["prompts"], cfg.fid.chunk_images, cfg.generate.batch_size)
        part = scoring.score_chunks(cfg, chunks, classify=classify)["curve"]["partial"]
        rows.append({"step": step, "samples_seen": step * cfg.train.batch_size, "fid": round(fid_of_moments(part.moments, ref), 2),
                     "n": gen["n"], "n_ref": ref.count, "latent_std": gen["latent_std"]})
        if classify:
            rows[-1]["prompt_accuracy"] = scoring.prompt_accuracy_of(part)["accuracy"]
        rows[-1]["seconds"] = round(time.time() - t0, 1)
        os.makedirs(os.path.join(run_dir, "curve"), exist_ok=True)
        with open(os.path.join(run_dir, "curve", f"{cfg.run.name}-step{step}.png"), "wb") as f:
            f.write(gen["grid_png"])  # the samples behind each point, to look at
        print(f"curve: {rows[-1]}", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    from jobs.demo import local_driver
    from pipeline import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", os.path.join(ROOT, "configs", "fashion_mnist.yaml")] + argv
    cfg, args = cli.parse(__doc__, argv, extra=_args)
    cli.setup_logging()
    run_dir = os.path.abspath(args.run_dir)
    with local_driver(cfg, run_dir):
        rows = score_checkpoints(cfg, run_dir, args.images, {int(s) for s in args.steps.split(",") if s.strip()})
    n_ref = rows[0]["n_ref"] if rows else "?"
    print("\n=== FID against training steps "
          f"({cfg.generate.sampler} {cfg.generate.steps} steps, guidance {cfg.generate.guidance_scale:g}, "
          f"{args.images} generated vs {n_ref} test) ===")
    print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
