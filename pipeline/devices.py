"""Where a stage runs: the `use_gpu` settings (auto/yes/no) against the connected Ray cluster."""

from __future__ import annotations


def resolve_use_gpu(setting: str) -> bool:
    """auto: whether the connected Ray cluster has GPUs; yes/no as said."""
    if setting != "auto":
        return setting == "yes"
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
