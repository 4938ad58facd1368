"""Checkpoint folders that are trusted only when complete.

A checkpoint is a folder holding `state.pt` (everything needed for an exact resume) and, written
last, `manifest.json` listing every file with its size. `load_checkpoint` refuses a folder whose
manifest is missing or whose files don't match it, so a crash mid-write or mid-upload can never be
resumed from. Ray Train uploads the folder to `RunConfig(storage_path, name)` and records it in its
own snapshot only after the upload finished; old checkpoints are deleted by Ray only after a newer
one is registered (CheckpointConfig.num_to_keep).
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"


class IncompleteCheckpoint(RuntimeError):
    """The folder is not a complete checkpoint (missing manifest, or files differ from it)."""


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(folder: str, state: dict, info: dict) -> None:
    """Write `state` (tensors and plain Python) then the manifest, last."""
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, STATE_FILE))
    files = {
        name: os.path.getsize(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if name != MANIFEST_FILE
    }
    tmp = os.path.join(folder, MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files, **info}, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, MANIFEST_FILE))


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.exists(path):
        raise IncompleteCheckpoint(f"{folder}: no {MANIFEST_FILE}; the checkpoint was never completed")
    with open(path) as f:
        manifest = json.load(f)
    for name, size in manifest["files"].items():
        p = os.path.join(folder, name)
        if not os.path.exists(p) or os.path.getsize(p) != size:
            raise IncompleteCheckpoint(f"{folder}: {name} is missing or truncated (expected {size} bytes)")
    return manifest


def load_checkpoint(folder: str, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(state, manifest) of a complete checkpoint; IncompleteCheckpoint otherwise."""
    manifest = read_manifest(folder)
    state = torch.load(os.path.join(folder, STATE_FILE), map_location=map_location, weights_only=False)
    return state, manifest


RESUME_SECTIONS = {"denoiser": ("schedule", "denoiser", "text_encoder", "vae"), "vae": ("vae",)}
"""Config sections a checkpoint's weights depend on, per task: resuming under different values would
silently continue a different model (e.g. a denoiser trained on another noise schedule)."""


def resume_conflicts(saved_cfg: dict, cfg_dict: dict, task: str) -> list[str]:
    """`section.key: checkpoint X, config Y` for each RESUME_SECTIONS[task] value that differs."""
    out = []
    for section in RESUME_SECTIONS[task]:
        old, new = saved_cfg.get(section, {}), cfg_dict.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.append(f"{section}.{key}: checkpoint {old.get(key)!r}, config {new.get(key)!r}")
    return out
