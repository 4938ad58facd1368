"""The whole pipeline on one machine: a local S3 server and Ray head, then
ingest -> [train_vae] -> encode -> train -> generate + FID, and everything started is stopped again.

    python -m jobs.demo --config configs/demo.yaml --run-dir runs/demo [--nodes 2] [section.key=value ...]

Writes RUN_DIR/summary.json and RUN_DIR/grid.png; Ray's and SeaweedFS's files stay under RUN_DIR.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from urllib.parse import urlparse

from pipeline import cli, storage
from pipeline.signals import sigterm_raises_exit


def _bucket(cfg) -> str:
    if storage.scheme(cfg.run.storage) == "s3":
        return urlparse(cfg.run.storage).netloc
    return "rld"


@contextlib.contextmanager
def local_driver(cfg, run_dir: str, nodes: int = 1):
    """This process as the Ray driver of a private S3 server and Ray head under `run_dir` (a cluster of
    `nodes` Ray nodes on loopback addresses if > 1), storage prepared; both are stopped on leaving,
    also on an error, Ctrl-C or SIGTERM. Yields (s3, head)."""
    from pipeline.dev.ray_head import RAY_ENV_DEFAULTS

    # Read by Ray at import: makes this driver, too, use 127.0.0.1 rather than the machine's address.
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    # `ray job stop`, `timeout` and `kill` send SIGTERM: as an exception, it lets the context managers
    # below stop SeaweedFS and the Ray head instead of orphaning them (from before Ray is imported).
    with sigterm_raises_exit():
        import ray

        from pipeline.dev.services import local_services

        # Several nodes share the machine's CPUs (at least one Ray CPU each): the point is several raylets
        # that can fail apart, as on a cluster, not more compute.
        cpus = max(1, (os.cpu_count() or 2) // nodes) if nodes > 1 else None
        with local_services(run_dir, bucket=_bucket(cfg), nodes=nodes, num_cpus=cpus) as (s3, head):
            print(f"local S3 at {s3.endpoint} (bucket {s3.bucket}), Ray head at {head.address}"
                  + (f" with {nodes - 1} more node(s)" if nodes > 1 else "") + f", dashboard {head.dashboard_url}", flush=True)
            head.connect(log_to_driver=True, logging_level=logging.INFO)
            try:
                cli.prepare_storage(cfg)
                yield s3, head
            finally:
                ray.shutdown()


def run(cfg, run_dir: str, nodes: int = 1) -> dict:
    from pipeline.data.encode import encode
    from pipeline.data.ingest import ingest
    from pipeline.eval.run import run as generate_and_evaluate
    from pipeline.train.trainer import fit
    from pipeline.train.vae_job import train_vae

    os.makedirs(run_dir, exist_ok=True)
    stages: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.time()
        print(f"\n=== {name} ===", flush=True)
        out = fn()
        stages[name] = round(time.time() - t0, 2)
        return out

    t_start = time.time()
    with local_driver(cfg, run_dir, nodes):
        ingested = timed("ingest", lambda: ingest(cfg))
        vae = timed("train_vae", lambda: train_vae(cfg)) if cfg.vae.source == "trained" else None
        manifest = timed("encode", lambda: encode(cfg))
        train = timed("train", lambda: fit(cfg))
        gen = timed("generate+fid", lambda: generate_and_evaluate(cfg, report=False))
        if cfg.eval.report:
            from pipeline.eval.report.build import build_report

            build_report(cfg, gen, stages, out_uris=(os.path.join(run_dir, "report"),))
    with open(os.path.join(run_dir, "grid.png"), "wb") as f:
        f.write(gen["grid_png"])
    fid = gen.get("fid") or {}
    summary = {
        "config": cfg.to_dict(),
        "stages": stages,
        "total_seconds": round(time.time() - t_start, 2),
        "counts": {
            "ingested": sum(ingested.values()) if ingested else manifest["n_in"],
            "encoded": manifest["n_encoded"],
            "rejected": manifest["n_rejected"],
            "generated": gen["n"],
        },
        "train": {k: train.get(k) for k in ("steps", "resumed_from", "final_loss", "checkpoint", "num_workers",
                                            "seconds")},
        "fid": {"value": fid.get("fid"), "n_gen": fid.get("n_gen"), "n_ref": fid.get("n_ref")},
        "generate": {k: gen[k] for k in ("sampler", "steps", "guidance_scale", "images_per_s", "latent_std", "uri")},
        "eval": gen.get("eval", {}),
        "vae": ({k: vae[k] for k in ("test_psnr", "test_kl_per_dim", "scaling_factor", "steps")} if vae
                else {"source": cfg.vae.source, "trained": manifest["vae"]["trained"]}),
        "untrained_encoders": manifest["untrained"],
        "encoders": {"text_encoder": manifest["text_encoder"], "vae": manifest["vae"]},
        "storage": cfg.run.storage,
        "grid": os.path.join(run_dir, "grid.png"),
        "report": os.path.join(run_dir, "report", "report.md") if cfg.eval.report else None,
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--run-dir", default="runs/demo")
        p.add_argument("--nodes", type=int, default=1,
                       help="Ray nodes to start on this machine (head on 127.0.0.2, the others after it); default 1 "
                            "(a single head on 127.0.0.1)")

    cfg, args = cli.parse(__doc__, argv, extra=extra)
    if args.nodes < 1:
        raise SystemExit(f"--nodes: must be at least 1, got {args.nodes}")
    cli.setup_logging()
    run_dir = os.path.abspath(args.run_dir)
    try:
        summary = run(cfg, run_dir, args.nodes)
    except KeyboardInterrupt:
        # The services are stopped by now (local_driver's context managers). Stages keep what they
        # committed: running the same command again resumes.
        print(f"\ninterrupted (Ctrl-C): the run's services are stopped; run the same command again to resume "
              f"from what {run_dir} holds", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    print("\n=== summary ===")
    print(json.dumps({k: summary[k] for k in ("stages", "counts", "vae", "train", "fid", "untrained_encoders")}, indent=2))
    untrained = [k for k in ("text_encoder", "vae") if not summary["encoders"][k]["trained"]]
    if untrained:
        print(f"NOTE: UNTRAINED {' and '.join(untrained)} (random init, no weights configured)"
              + (": expect a poor FID and unrecognisable images." if "vae" in untrained else
                 ": captions are encoded by a random T5, so prompts steer the samples only weakly."))
    print(f"summary: {run_dir}/summary.json  grid: {summary['grid']}  report: {summary['report']}  "
          f"outputs: {summary['generate']['uri']}")
    return summary


if __name__ == "__main__":
    main()
