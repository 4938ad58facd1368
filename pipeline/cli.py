"""What every job shares: argument parsing into a Config, logging, and connecting to Ray."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator

from pipeline import config as config_mod
from pipeline import storage


def parse(description: str, argv: list[str] | None = None, extra=None):
    """`--config FILE` plus `section.key=value` overrides. Returns (Config, argparse namespace)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config (see configs/); defaults are used if omitted")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=500")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (host:port of its GCS, or 'auto'); default: RAY_ADDRESS, "
                        "which `ray job submit` sets; with neither, a private Ray head on 127.0.0.1 is "
                        "started for this run and stopped at its end")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except config_mod.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    storage.configure(cfg.io)  # this driver, and (runtime_env below) every Ray worker of its job
    return cfg, args


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster a job should join: `address` (--ray-address), else RAY_ADDRESS, else None."""
    return address or os.environ.get("RAY_ADDRESS") or None


def runtime_env() -> dict | None:
    """The runtime_env this driver gives its Ray job: the non-secret storage settings (see
    storage.worker_env: io limits, endpoint, region), so every task, actor and Train worker talks to
    the same endpoint with the same limits, whatever the environment the cluster was started with.

    Under `ray job submit`, ray.init merges it with the job's runtime_env per variable and refuses to
    start if a variable is set in both: those the job sets are left to the job (the submitter chose
    them; a value other than this driver's is logged)."""
    env = storage.worker_env()
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # set by the job supervisor
    job_env = (submitted.get("runtime_env") or {}).get("env_vars") or {}
    for key in sorted(set(env) & set(job_env)):
        if env[key] != job_env[key]:  # (only non-secret storage settings are in `env`)
            logging.getLogger(__name__).warning(
                "the job's runtime_env sets %s=%s: its Ray workers use that, this driver %s", key, job_env[key], env[key])
        del env[key]
    return {"env_vars": env} if env else None


def connect_ray(address: str | None = None) -> None:
    """Join the cluster at `address` or RAY_ADDRESS (set by `ray job submit`); no-op if connected.

    Never calls ray.init() without an address: that would join whatever cluster last ran `ray start`
    on this machine (someone else's, another run's), or start one listening on every interface.
    With no address, use `with ray_session(...)`, which starts a private head.
    """
    import ray

    if ray.is_initialized():
        return
    target = cluster_address(address)
    if target is None:
        raise RuntimeError("no Ray cluster address: pass --ray-address or set RAY_ADDRESS, "
                           "or use `with cli.ray_session():` to start a private local cluster")
    from pipeline.signals import reclaim_sigterm

    before = signal.getsignal(signal.SIGTERM)
    ray.init(address=target, log_to_driver=True, runtime_env=runtime_env())
    reclaim_sigterm(before)  # `ray job stop` sends SIGTERM: let `finally` blocks run


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[str]:
    """This process as a Ray driver for the duration of the block; yields the cluster's address.

    - Already connected (e.g. inside jobs.demo): nothing is done.
    - `address` (--ray-address) or RAY_ADDRESS (set by `ray job submit`): join that cluster.
    - Neither: start a private Ray head on 127.0.0.1 (pipeline.dev.ray_head.LocalRay, token auth with a
      token of its own, in a short temporary run folder), and stop it when the block ends, also on
      an error, Ctrl-C or SIGTERM. Its folder is removed after a clean end and kept (path printed)
      after a failure, for its logs. The S3 variables in os.environ reach its workers.
    Either way the job gets `runtime_env()` (storage endpoint and io limits, no credentials).
    """
    import ray

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    target = cluster_address(address)
    if target is not None:
        connect_ray(target)
        try:
            yield target
        finally:
            ray.shutdown()
        return

    from pipeline.dev.ray_head import RAY_ENV_DEFAULTS
    from pipeline.dev.services import local_ray

    for k, v in RAY_ENV_DEFAULTS.items():  # as the head's: 127.0.0.1 only, no usage stats
        os.environ.setdefault(k, v)
    run_dir = tempfile.mkdtemp(prefix="rld-ray-")
    clean = False
    try:
        # local_ray: a watchdog stops the head if this process is killed (RUN_DIR/services.json).
        with local_ray(run_dir, num_cpus=num_cpus) as head:
            print(f"ray: no cluster given (--ray-address / RAY_ADDRESS): started a private Ray head at "
                  f"{head.address} (dashboard {head.dashboard_url}, folder {run_dir}) for this run", flush=True)
            head.connect(log_to_driver=True, runtime_env=runtime_env())
            try:
                yield head.address
            finally:
                ray.shutdown()
        clean = True
    finally:
        if clean:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"ray: the private Ray head was stopped; its logs are in {run_dir}", file=sys.stderr, flush=True)


def prepare_storage(cfg) -> None:
    from pipeline import storage

    storage.ensure_bucket(cfg.run.storage)
    storage.makedirs(cfg.run.storage)
