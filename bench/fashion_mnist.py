"""The Fashion-MNIST benchmark chain: local S3 + Ray, train_vae -> encode -> train -> generate + eval.

    .venv/bin/python bench/fashion_mnist.py [--run-dir runs/fashion] [section.key=value ...]

A benchmark, not a test: CI runs the same code through `jobs.demo` on configs/tiny.yaml. Its last
lines are the figures the issue tracks (targets: VAE PSNR >= 28 dB, FID <= 25 on 5k vs 10k test,
prompt accuracy >= 85%), so that runs can be compared side by side.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> dict:
    from jobs import demo
    from pipeline import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", os.path.join(ROOT, "configs", "fashion_mnist.yaml")] + argv
    if "--run-dir" not in argv:
        argv += ["--run-dir", os.path.join(ROOT, "runs", "fashion")]
    cfg, args = cli.parse(__doc__, argv, extra=lambda p: p.add_argument("--run-dir"))
    cli.setup_logging()
    summary = demo.run(cfg, os.path.abspath(args.run_dir))
    ev = summary.get("eval", {})
    print("\n=== benchmark ===")
    print(json.dumps(ev.get("sweeps", []), indent=1))
    print(f"vae_test_psnr_db {summary['vae'].get('test_psnr')}")
    print(f"fid {summary['fid']['value']} (n_gen {summary['fid']['n_gen']}, n_ref {summary['fid']['n_ref']})")
    print(f"prompt_accuracy {(ev.get('prompt_accuracy') or {}).get('accuracy')}")
    print(f"vlb_bits_per_dim {(ev.get('vlb') or {}).get('bits_per_dim')}")
    print("stage_seconds " + json.dumps(summary["stages"]))
    return summary


if __name__ == "__main__":
    main()
