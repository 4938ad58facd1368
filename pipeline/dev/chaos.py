"""Faults on purpose, for the fault tests and bench/soak.py: find and SIGKILL Ray Train workers, and
read back what a training run left (per-step losses, final weights' hash, its attempts).

Processes are found with psutil: a Ray Train worker's process title is `ray::RayTrainWorker...`
(Ray Train 2.60); Ray workers stay in the session of the node (`ray start`) that made them, which is
how one node's workers are told apart from another's on one machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import psutil

from pipeline import paths, storage

TRAIN_WORKER = "RayTrainWorker"


def train_worker_pids(session: int | None = None, token: str | None = None) -> list[int]:
    """Live Ray Train worker processes; only those of node session `session`, and/or of the cluster
    whose RAY_AUTH_TOKEN is `token` (every process of a LocalRay/LocalCluster inherits its token)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if any(TRAIN_WORKER in part for part in (p.info["cmdline"] or [])) and p.status() != psutil.STATUS_ZOMBIE:
                if (session is None or os.getsid(p.pid) == session) and \
                        (token is None or p.environ().get("RAY_AUTH_TOKEN") == token):
                    out.append(p.pid)
    return sorted(out)


def sigkill(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL `pid` and wait until it is gone (it must have existed: a fault that did not happen is
    an error, not a pass)."""
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout)


def wait_for(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.2):
    """Poll `condition` until it returns something truthy (returned) or `timeout` s pass (TimeoutError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout:.0f}s: {what}")
        time.sleep(poll)


def history(cfg, task: str = "denoiser") -> list[dict]:
    """Rank 0's metric history of the run (one entry per report; per step with report_every=1)."""
    uri = storage.join(paths.outputs(cfg), f"{task}_metrics.json")
    return storage.read_json(uri) if storage.exists(uri) else []


def reported_step(cfg, task: str = "denoiser", attempt: str | None = None) -> int:
    """The last step rank 0 reported (0 before the first report); with `attempt`, the last that this
    worker group reported (a restarted group rewrites the history only at its first report)."""
    h = [m for m in history(cfg, task) if attempt is None or m.get("attempt") == attempt]
    return int(h[-1]["step"]) if h else 0


def current_attempt(cfg, task: str = "denoiser", timeout: float = 300) -> str:
    """The id of the worker group that trains now (waits for the first one to start)."""
    return wait_for(lambda: attempts(cfg, task), timeout, "a worker group to start")[-1]["attempt"]


def losses(cfg, task: str = "denoiser") -> dict[int, float]:
    return {int(m["step"]): m["loss"] for m in history(cfg, task) if "lr" in m}


def attempts(cfg, task: str = "denoiser") -> list[dict]:
    from pipeline.train.trainer import starts_uri

    uri = starts_uri(cfg, task)
    return storage.read_json(uri) if storage.exists(uri) else []


def tree_sha256(tree) -> str:
    """One sha256 over a nested state (dicts in key order, tensors by dtype, shape and bytes)."""
    import hashlib

    import torch

    digest = hashlib.sha256()

    def visit(node, path: str) -> None:
        if isinstance(node, dict):
            for k in sorted(node, key=str):
                visit(node[k], f"{path}.{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, f"{path}[{i}]")
        elif isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            digest.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(f"{path}={node!r}".encode())

    visit(tree, "")
    return digest.hexdigest()


def final_weights_sha256(cfg, task: str = "denoiser") -> dict:
    """The newest verified checkpoint's step and a sha256 each of its model, EMA, optimizer and LR
    schedule state and data position. Not its RNG states: training draws from its own generator,
    seeded by (seed, rank, step), while the process-wide ones (Python, NumPy, torch's default) are
    also advanced by Ray and library code, differently in a restarted process."""
    import tempfile

    from pipeline.checkpoint_store import fetch
    from pipeline.train.trainer import latest_checkpoint_uri

    with tempfile.TemporaryDirectory() as tmp:
        sd, manifest = fetch(latest_checkpoint_uri(cfg, task), tmp)
    out = {"step": manifest["step"]}
    for part in ("model", "ema", "optimizer", "lr_scheduler"):
        out[part] = tree_sha256(sd[part])
    out["position"] = (sd["step"], sd["epoch"], sd["batch_in_epoch"], sd["nonfinite_skipped"])
    return out


def start_job(cluster, job: str, config_path: str, overrides: list[str], root: str) -> subprocess.Popen:
    """`python -m jobs.<job> --config ... --ray-address <cluster>` as its own driver process (what
    `ray job submit` would run), output captured; `root` is the repository to run it from."""
    env = {**os.environ, **cluster.auth_env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": root}
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty job can never block on it
    proc = subprocess.Popen([sys.executable, "-m", f"jobs.{job}", "--config", config_path, "--ray-address",
                             cluster.address, *overrides], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def job_output(proc: subprocess.Popen) -> str:
    """What a start_job process has written so far."""
    proc.log.flush()  # type: ignore[attr-defined]
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()  # type: ignore[attr-defined]


def finish_job(proc: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a start_job process; its output. Raises (with the output's tail) unless it exited 0;
    kills it if it outlives `timeout`."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = job_output(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(proc.args[1:4])} exited {proc.returncode}:\n{out[-6000:]}")
    return out
