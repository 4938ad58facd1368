"""Checkpoint folders that can neither lie nor attack.

A checkpoint is a folder of two data files and, written last, a manifest:
- `tensors.safetensors`: every tensor of the training state (model, EMA, optimizer moments, RNG);
- `state.json`: everything else (step, epoch, data position, optimizer and LR-schedule scalars,
  Python/NumPy RNG states) as a JSON tree in which each tensor is a reference into the first file;
- `manifest.json`: every data file's size and sha256, plus step, epoch, config and data identity.

Nothing here unpickles: safetensors and JSON can only ever produce tensors, numbers, strings,
lists and dicts, so a hostile file in the bucket cannot run code. `load_checkpoint` verifies every
file against the manifest (size, then sha256) before reading it, so a truncated or bit-flipped file
raises `IncompleteCheckpoint` instead of being trained on; callers then fall back to an older one
(`pipeline.checkpoint_store.load_newest_trusted`). No non-finite tensor is ever written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import torch

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
FORMAT = "rld-checkpoint-2"
"""Manifest format: 2 = safetensors + JSON with sha256 (1 was a pickled state.pt, never loaded now)."""


class IncompleteCheckpoint(RuntimeError):
    """The folder is not a checkpoint this code trusts: no manifest (never finished), a file missing,
    truncated or with another sha256 than the manifest says, or an unknown (e.g. pickled) format."""


class NonFiniteCheckpoint(ValueError):
    """A tensor about to be checkpointed holds NaN or Inf: refusing to write it."""


# ------------------------------------------------------------------------------ state <-> JSON tree


def to_tree(obj, tensors: dict, path: str = "s"):
    """A JSON-able tree of `obj`; tensors go into `tensors` under their path and are referenced.
    Anything but tensors, arrays, dicts, lists, tuples and JSON scalars is refused (never pickled)."""
    if isinstance(obj, torch.Tensor):
        if path in tensors:  # a dict key holding "." could alias another path
            raise ValueError(f"{path}: two tensors would share this name in the checkpoint")
        tensors[path] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [to_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # Non-string keys (the optimizer's per-parameter state is keyed by int): pairs, keys kept typed.
        return {"__dict__": [[to_tree(k, tensors, f"{path}.k{i}"), to_tree(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path}: a {type(obj).__name__} cannot go into a checkpoint (only tensors and plain data)")


def from_tree(tree, tensors: dict):
    """The inverse of to_tree."""
    if isinstance(tree, list):
        return [from_tree(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return np.asarray(tree["__ndarray__"], dtype=np.dtype(tree["dtype"]))
    if "__tuple__" in tree:
        return tuple(from_tree(v, tensors) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {_hashable(from_tree(k, tensors)): from_tree(v, tensors) for k, v in tree["__dict__"]}
    return {k: from_tree(v, tensors) for k, v in tree.items()}


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())  # the checkpoint may have been loaded onto a GPU
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ------------------------------------------------------------------------------------ save and load


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_finite(tensors: dict) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteCheckpoint(f"non-finite values in {len(bad)} tensor(s), e.g. {bad[:3]}: not checkpointed")


def save_checkpoint(folder: str, state: dict, info: dict) -> None:
    """Write the tensors and the JSON state, then the manifest (sizes and sha256) last."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors: dict = {}
    tree = to_tree(state, tensors)
    check_finite(tensors)
    save_file(tensors, os.path.join(folder, TENSORS_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump(tree, f)
    files = {
        name: {"size": os.path.getsize(os.path.join(folder, name)), "sha256": sha256_file(os.path.join(folder, name))}
        for name in (TENSORS_FILE, STATE_FILE)
    }
    tmp = os.path.join(folder, MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "files": files, **info}, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, MANIFEST_FILE))


def read_manifest(folder: str) -> dict:
    """The manifest of a complete local checkpoint folder, every file checked against it (size and
    sha256); IncompleteCheckpoint names what is wrong otherwise."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.exists(path):
        raise IncompleteCheckpoint(f"{folder}: no {MANIFEST_FILE}; the checkpoint was never completed")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise IncompleteCheckpoint(f"{folder}: unreadable {MANIFEST_FILE} ({e})") from None
    check_manifest_format(manifest, folder)
    for name, want in manifest["files"].items():
        p = os.path.join(folder, name)
        if not os.path.exists(p) or os.path.getsize(p) != want["size"]:
            raise IncompleteCheckpoint(f"{folder}: {name} is missing or truncated (expected {want['size']} bytes)")
        if sha256_file(p) != want["sha256"]:
            raise IncompleteCheckpoint(f"{folder}: {name} does not match its sha256 in the manifest (corrupted)")
    return manifest


def check_manifest_format(manifest, where: str) -> None:
    """IncompleteCheckpoint unless `manifest` is this format's: a step, and size + sha256 of exactly
    the two data files (so a malformed manifest is one more untrusted folder, never a crash)."""
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise IncompleteCheckpoint(
            f"{where}: not a {FORMAT} checkpoint (format {fmt!r}); pickled checkpoints (state.pt) of "
            "earlier versions are never loaded: train under a new run.name"
        )
    files = manifest.get("files")
    ok = (isinstance(files, dict) and set(files) == {TENSORS_FILE, STATE_FILE}
          and all(isinstance(f, dict) and type(f.get("size")) is int and isinstance(f.get("sha256"), str)
                  for f in files.values())
          and type(manifest.get("step")) is int)
    if not ok:
        raise IncompleteCheckpoint(f"{where}: malformed {MANIFEST_FILE} (needs step, and size and sha256 of "
                                   f"{TENSORS_FILE} and {STATE_FILE})")


def load_checkpoint(folder: str, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(state, manifest) of a verified local checkpoint folder; IncompleteCheckpoint otherwise."""
    from safetensors.torch import load_file

    manifest = read_manifest(folder)
    try:
        tensors = load_file(os.path.join(folder, TENSORS_FILE), device=str(map_location))
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = from_tree(json.load(f), tensors)
    except Exception as e:  # hashes matched, yet the content is not ours: never trusted either
        raise IncompleteCheckpoint(f"{folder}: its files match the manifest but do not parse ({type(e).__name__}: {e})") from None
    return state, manifest
