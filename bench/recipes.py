"""Which recipe buys the best images for the same training minutes, side by side on Fashion-MNIST.

    .venv/bin/python bench/recipes.py --run-dir runs/recipes [--recipes baseline,v_min_snr,...]
        [--steps 2000] [--every 1000] [--images 1000] [key=value ...]

One ingest, one VAE and one encode are shared by every recipe (each recipe's run reads the VAE this
run exported as `vae.source: pretrained`, so all of them train on the same latents); each recipe's
denoiser is then trained from scratch under run.name <run.name>-<recipe> and every kept checkpoint is
scored (FID of `--images` generated against the cached test statistics, prompt accuracy). Training
minutes are compute minutes: each report's steps over its measured samples/s, so checkpoint uploads
and worker start-up do not count against a recipe. Prints a table as its last lines and writes
RUN_DIR/recipes.json and RUN_DIR/recipes.png (FID against training minutes, one line per recipe).
A benchmark, not a test; recipes that were trained already are scored again, not retrained.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: Overrides on top of the base config, each a change practitioners credit with faster convergence.
RECIPES: dict[str, list[str]] = {
    "baseline": [],  # the committed config: UNet, epsilon, uniform timesteps, equal weights
    "v_min_snr": ["schedule.prediction=v", "train.loss_weighting=min_snr"],  # Hang et al. 2023 (gamma 5)
    "flow": ["schedule.prediction=flow", "schedule.timestep_sampling=logit_normal"],  # SD3's rectified flow
    "dit_flow": ["schedule.prediction=flow", "schedule.timestep_sampling=logit_normal", "denoiser.arch=dit",
                 "denoiser.patch_size=2", "denoiser.dit_layers=6", "denoiser.dit_heads=6", "denoiser.dit_head_dim=32"],
}


def _args(p) -> None:
    p.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "recipes"))
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(RECIPES)}")
    p.add_argument("--steps", type=int, default=2000, help="denoiser steps per recipe")
    p.add_argument("--every", type=int, default=1000, help="steps between scored checkpoints")
    p.add_argument("--images", type=int, default=1000, help="generated images per scored checkpoint")


def training_minutes(history: list[dict], batch_size: int) -> dict[int, float]:
    """{step: compute minutes to reach it} from a run's metric history (one entry per report)."""
    out, minutes, prev = {}, 0.0, 0
    for m in sorted(history, key=lambda m: m["step"]):
        if m["step"] > prev and m.get("samples_per_s"):
            minutes += (m["step"] - prev) * batch_size / m["samples_per_s"] / 60
            prev = m["step"]
        out[m["step"]] = round(minutes, 2)
    return out


def plot(rows: list[dict], path: str, workers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["recipe"] for r in rows):
        pts = sorted((r["minutes"], r["fid"]) for r in rows if r["recipe"] == name and r["minutes"] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel(f"training minutes (compute, {workers} workers)")
    ax.set_ylabel(f"FID ({rows[0]['n']} generated vs {rows[0]['n_ref']} test)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    from bench.fid_curve import score_checkpoints
    from jobs.demo import local_driver
    from pipeline import cli, config, paths, storage
    from pipeline.data.encode import encode
    from pipeline.data.ingest import ingest
    from pipeline.train.trainer import fit
    from pipeline.train.vae_job import train_vae

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", os.path.join(ROOT, "configs", "fashion_mnist.yaml")] + argv
    cfg, args = cli.parse(__doc__, argv, extra=_args)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; one of: {', '.join(RECIPES)}")
    base = [a for a in argv if "=" in a and not a.startswith("--")]  # the user's key=value overrides
    config_path = argv[argv.index("--config") + 1]
    cli.setup_logging()
    shared = ["vae.source=pretrained", f"vae.pretrained={paths.vae_export(cfg)}", f"train.steps={args.steps}",
              f"train.checkpoint_every={args.every}", f"train.num_to_keep={args.steps // args.every + 1}",
              "eval.sweep_samplers=[dpm:20]", "eval.vlb_latents=0"]  # no sweeps or bound here (not all exist for flow)
    # Every recipe's config is checked before any work starts.
    cfgs = {n: config.load(config_path, base + shared + RECIPES[n] + [f"run.name={cfg.run.name}-{n}"]) for n in names}
    run_dir, rows = os.path.abspath(args.run_dir), []
    with local_driver(cfg, run_dir):
        ingest(cfg)
        if not storage.is_committed(paths.vae_export(cfg)):
            train_vae(cfg)
        for name, rcfg in cfgs.items():
            encode(rcfg)  # the first recipe encodes; the others find the same latents committed
            trained = fit(rcfg)
            history = storage.read_json(storage.join(paths.outputs(rcfg), "denoiser_metrics.json"))
            minutes = training_minutes(history, rcfg.train.batch_size)
            for r in score_checkpoints(rcfg, run_dir, args.images):
                rows.append({"recipe": name, "minutes": minutes.get(r["step"]), "fit_seconds": trained.get("seconds"),
                             **{k: r[k] for k in ("step", "fid", "prompt_accuracy", "latent_std", "n", "n_ref") if k in r}})
            with open(os.path.join(run_dir, "recipes.json"), "w") as f:
                json.dump({"recipes": {n: RECIPES[n] for n in names}, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(run_dir, "recipes.png"), cfg.train.num_workers)
    print(f"\n=== recipes ({cfg.generate.sampler} {cfg.generate.steps}, guidance {cfg.generate.guidance_scale:g}; "
          f"plot {os.path.join(run_dir, 'recipes.png')}) ===")
    print("| recipe | step | training minutes | FID | prompt accuracy | latent std |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['step']} | {r['minutes']} | {r['fid']} | {r.get('prompt_accuracy')} | "
              f"{r['latent_std']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
