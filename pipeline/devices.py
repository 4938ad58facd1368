"""Where a stage runs: the `use_gpu` settings (auto/yes/no) against the connected Ray cluster."""

from __future__ import annotations


def resolve_use_gpu(setting: str) -> bool:
    """auto: whether the connected Ray cluster has GPUs; yes/no as said."""
    if setting != "auto":
        return setting == "yes"
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


POOL_START_TIMEOUT_S = 600  # an autoscaling cluster may take minutes to bring the nodes a pool asks for


def start_whole_pool(ds):
    """Make a Ray Data dataset's actor pools start all their actors before any work is given out (else
    the first actor up may take every block of a small job, and a pool meant to spread over the nodes
    runs on one). A cluster that cannot host the pool fails after POOL_START_TIMEOUT_S, saying so."""
    ds.context.wait_for_min_actors_s = POOL_START_TIMEOUT_S
    return ds
