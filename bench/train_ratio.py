"""Denoiser training as the pipeline runs it against a plain PyTorch loop on the same cores, A/B interleaved.

    .venv/bin/python bench/train_ratio.py [--config configs/demo.yaml] [--run-dir runs/train_ratio]
        [--rounds 3] [--steps 300] [--workers 1,2] [--device cpu] [key=value ...]

Data: the config's dataset, ingested and encoded once with a random-init VAE (`vae.source=random`:
no VAE training; the latents keep the config's shape). Each round then runs, in turn:
  ray-N   `fit()`: Ray Train with train.num_workers=N, a fresh run each round (checkpoints at the end only);
  local   `train_locally`: the same loop and step without Ray, one process, every core's threads;
  bare    a plain loop over the same tensors: the model, AdamW, the DDPM noising and MSE, the EMA.
samples/s is steady state: all report intervals after the first (so per-epoch stalls count, the
first step's warm-up does not); `overhead_s` is a call's wall time minus the compute time its
intervals account for (start-up, the final checkpoint, teardown). The last lines give per variant
the median [min-max] over rounds and the ratio of medians to `bare`. A benchmark, not a test.

`--device cuda` (a GPU machine, no Ray or storage needed): `local` and `bare` only, on random
tensors of the config's shapes.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _args(p) -> None:
    p.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "train_ratio"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="training steps per call")
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to run (comma-separated)")
    p.add_argument("--device", default="cpu")


def steady(reports: list[dict], batch_size: int, wall: float) -> dict:
    """samples/s over the report intervals after the first, and the wall time they do not explain."""
    reports = sorted(reports, key=lambda r: r["step"])
    seconds = [(b["step"] - a["step"]) * batch_size / b["samples_per_s"] for a, b in zip(reports, reports[1:])]
    compute = reports[0]["step"] * batch_size / reports[0]["samples_per_s"] + sum(seconds)
    steps = reports[-1]["step"] - reports[0]["step"]
    return {"samples_per_s": steps * batch_size / sum(seconds), "overhead_s": wall - compute}


def bare_loop(cfg, manifest: dict, data: dict, steps: int, device: str, report_every: int) -> list[dict]:
    """What a user would write alone: no checkpoints, no metrics beyond the loss, no sample records."""
    import torch
    from diffusers import DDPMScheduler

    from pipeline.models.denoiser import build_denoiser_for, predict

    model = build_denoiser_for(cfg, manifest).to(device).train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    sched = DDPMScheduler(num_train_timesteps=cfg.schedule.num_train_timesteps, beta_schedule=cfg.schedule.beta_schedule,
                          beta_start=cfg.schedule.beta_start, beta_end=cfg.schedule.beta_end)
    abar = sched.alphas_cumprod.to(device)
    n, bs = len(data["latent"]), cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    reports, t0, losses = [], time.perf_counter(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (bs,), generator=g)
        x0 = data["latent"][idx].to(device)
        emb, mask = data["text_emb"][idx].to(device), data["text_mask"][idx].to(device)
        t = torch.randint(0, len(abar), (bs,), device=device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(predict(model, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, emb, mask), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - cfg.train.ema_decay)
        losses.append(loss.detach())
        if step % report_every == 0:
            float(losses[-1])  # wait for the device
            now = time.perf_counter()
            reports.append({"step": step, "samples_per_s": report_every * bs / (now - t0),
                            "loss": float(torch.stack(losses).mean())})
            t0, losses = now, []
    return reports


def summarize(results: dict[str, list[dict]]) -> None:
    print("\n=== denoiser training: samples/s, median [min-max] over rounds; ratio of medians to bare ===")
    base = statistics.median(r["samples_per_s"] for r in results["bare"])
    for name, rs in results.items():
        sps = [r["samples_per_s"] for r in rs]
        over = [r["overhead_s"] for r in rs]
        print(f"{name:8s} {statistics.median(sps):7.1f} [{min(sps):.1f}-{max(sps):.1f}] samples/s  "
              f"ratio {statistics.median(sps) / base:.2f}  overhead {statistics.median(over):.1f} s "
              f"[{min(over):.1f}-{max(over):.1f}]")


def main(argv=None) -> dict:
    import numpy as np
    import torch

    from pipeline import cli, config, paths
    from pipeline.train import tasks
    from pipeline.train.loop import train_locally

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", os.path.join(ROOT, "configs", "demo.yaml")] + argv
    cfg, args = cli.parse(__doc__, argv, extra=_args)
    cpu = args.device == "cpu"
    overrides = [a for a in argv if "=" in a and not a.startswith("--")]
    overrides += ["vae.source=random", f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
                  f"train.report_every={max(1, args.steps // 6)}", "eval.vlb_latents=0"]
    config_path = argv[argv.index("--config") + 1]
    cfg = config.load(config_path, overrides + [f"run.name={cfg.run.name}-ratio"])
    workers = [int(w) for w in args.workers.split(",") if w.strip()] if cpu else []
    cli.setup_logging()
    results: dict[str, list[dict]] = {**{f"ray-{w}": [] for w in workers}, "local": [], "bare": []}
    run_dir = os.path.abspath(args.run_dir)

    def rounds(prepare_data, fit_round):
        manifest, data, null = prepare_data()
        for r in range(args.rounds):
            for w in workers:
                results[f"ray-{w}"].append(fit_round(w, r))
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                reports = train_locally(cfg, manifest, *null, data, tmp, device=args.device)
                results["local"].append(steady(reports, cfg.train.batch_size, time.perf_counter() - t0))
            t0 = time.perf_counter()
            reports = bare_loop(cfg, manifest, data, args.steps, args.device, cfg.train.report_every)
            results["bare"].append(steady(reports, cfg.train.batch_size, time.perf_counter() - t0))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]['samples_per_s']:.1f}" for k, v in results.items()), flush=True)

    if not cpu:  # hot paths only: random tensors of the config's shapes
        from pipeline.models.text import build_text_encoder
        from pipeline.models.vae import build_vae_for, latent_shape

        def random_data():
            vae, _ = build_vae_for(cfg)
            shape, text = list(latent_shape(vae, cfg.data.image_size)), build_text_encoder(cfg.text_encoder, 0)
            manifest = {"latent_shape": shape, "text_shape": [cfg.text_encoder.max_length, text.dim]}
            g, n = torch.Generator().manual_seed(0), 4096
            data = {"latent": torch.randn(n, *shape, generator=g),
                    "text_emb": torch.randn(n, *manifest["text_shape"], generator=g),
                    "text_mask": torch.ones(n, cfg.text_encoder.max_length, dtype=torch.int64)}
            return manifest, data, (torch.zeros(manifest["text_shape"]), torch.ones(manifest["text_shape"][0], dtype=torch.int64))

        rounds(random_data, None)
        summarize(results)
        return results

    from jobs.demo import local_driver
    from pipeline import storage
    from pipeline.data.encode import encode
    from pipeline.data.ingest import ingest
    from pipeline.train.trainer import fit

    def stored_data():
        ingest(cfg)
        encode(cfg)
        task = tasks.get("denoiser")
        prepared = task.prepare(cfg)
        table = task.table(cfg, prepared)
        data = {"key": table["key"], "latent": torch.from_numpy(table["latent"]),
                "text_emb": torch.from_numpy(table["text_emb"].astype(np.float32)),
                "text_mask": torch.from_numpy(table["text_mask"].astype(np.int64))}
        null = (torch.tensor(prepared["null_emb"]), torch.tensor(prepared["null_mask"]))
        return prepared["manifest"], data, null

    def fit_round(w: int, r: int) -> dict:
        run_cfg = config.load(config_path, overrides + [f"train.num_workers={w}", f"run.name={cfg.run.name}-ray{w}-{r}"])
        t0 = time.perf_counter()
        fit(run_cfg)
        wall = time.perf_counter() - t0
        history = storage.read_json(storage.join(paths.outputs(run_cfg), "denoiser_metrics.json"))
        return steady(history, run_cfg.train.batch_size, wall)

    with local_driver(cfg, run_dir):
        rounds(stored_data, fit_round)
    summarize(results)
    return results


if __name__ == "__main__":
    main()
