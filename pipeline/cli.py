"""What every job shares: argument parsing into a Config, logging, and connecting to Ray."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline import config as config_mod


def parse(description: str, argv: list[str] | None = None, extra=None):
    """`--config FILE` plus `section.key=value` overrides. Returns (Config, argparse namespace)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config (see configs/); defaults are used if omitted")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=500")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except config_mod.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return cfg, args


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def connect_ray(address: str | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`) or `address`; else start a local one."""
    import ray

    if ray.is_initialized():
        return
    from pipeline.local import reclaim_sigterm

    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    reclaim_sigterm()  # `ray job stop` sends SIGTERM: let `finally` blocks run


def prepare_storage(cfg) -> None:
    from pipeline import storage

    storage.ensure_bucket(cfg.run.storage)
    storage.makedirs(cfg.run.storage)
