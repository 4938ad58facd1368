"""Checkpoints in object storage: the one definition of "trusted" that training and generate share.

A stored checkpoint folder (`<storage>/checkpoints/<run>/checkpoint_<step>-<attempt>/`) is trusted when
it passes `checkpoint.read_manifest` after download: its manifest exists, has this code's format, and
every file it lists has the recorded size and sha256. Listing (`candidates`) checks only the cheap
part (manifest present and well-formed, sizes); loading (`load_newest_trusted`) verifies the hashes
and falls back, loudly, to the next older candidate when the newest fails.

This module, not Ray Train's checkpoint registry, owns the folders: rank 0 uploads each checkpoint
itself (`save_to_storage`: files first, manifest last, under a name no earlier attempt used) and then
deletes the oldest trusted ones beyond `num_to_keep` (`prune`), only ever after a newer one is in
place. Ray Train is told metrics only, so its registry can never point at a folder this module
replaced or deleted. Folders without a manifest are never trusted; `fit` deletes them before
training starts (`remove_incomplete`). Folders that fail verification are skipped, and kept as
evidence until retention reaches them.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid

from pipeline import storage
from pipeline.checkpoint import (
    MANIFEST_FILE,
    IncompleteCheckpoint,
    check_manifest_format,
    load_checkpoint,
)

log = logging.getLogger(__name__)

_NAME = re.compile(r"checkpoint_\d{8}(-[0-9a-f]{8})?")
"""Our folder names (`checkpoint_<step>-<attempt>`); anything else under the run (Ray Train's own
files, folders of older versions) is neither trusted nor touched."""


def folder_name(step: int) -> str:
    """A new folder name for a checkpoint at `step`: a resumed run that reaches the same step again
    writes beside, never over, what an earlier attempt left (which may be evidence, or in use)."""
    return f"checkpoint_{step:08d}-{uuid.uuid4().hex[:8]}"


def _folders(run_uri: str) -> list[str]:
    return [u for u in storage.ls(run_uri) if _NAME.fullmatch(u.rstrip("/").rsplit("/", 1)[-1])]


def candidates(run_uri: str) -> list[tuple[int, str]]:
    """(step, folder) of checkpoints under `run_uri` whose manifest exists, is well-formed and whose
    files have the recorded sizes; oldest first. Hashes are checked on load."""
    found = []
    for folder in _folders(run_uri):
        manifest_uri = storage.join(folder, MANIFEST_FILE)
        if not storage.exists(manifest_uri):
            continue  # never completed
        try:
            manifest = storage.read_json(manifest_uri)
            check_manifest_format(manifest, folder)
            for name, f in manifest["files"].items():
                if storage.size(storage.join(folder, name)) != f["size"]:
                    raise IncompleteCheckpoint(f"{folder}: {name} is missing or has another size than its manifest says")
        except storage.StorageUnavailable:
            raise  # storage down or stalled says nothing about the checkpoint: never fall back past it
        except (IncompleteCheckpoint, ValueError, OSError) as e:
            log.error("checkpoint %s is not trusted: %s", folder, e)
            continue
        found.append((manifest["step"], folder))
    return sorted(found)


def fetch(folder_uri: str, local_dir: str, map_location="cpu") -> tuple[dict, dict]:
    """Download a stored checkpoint into `local_dir` and load it, verified (IncompleteCheckpoint if not)."""
    return load_checkpoint(storage.download_dir(folder_uri, local_dir), map_location=map_location)


def load_newest_trusted(run_uri: str, map_location="cpu") -> tuple[str, dict, dict] | None:
    """(folder, state, manifest) of the newest checkpoint under `run_uri` that verifies, or None.
    A newer one that fails verification is reported as an error and skipped (not deleted here: it is
    evidence, until retention prunes it as it would any older checkpoint)."""
    for step, folder in reversed(candidates(run_uri)):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                state, manifest = fetch(folder, tmp, map_location)
            except IncompleteCheckpoint as e:
                log.error("CHECKPOINT FAILED VERIFICATION, falling back to an older one: %s", e)
                print(f"checkpoint: FAILED VERIFICATION, not used: {e}", flush=True)
                continue
        return folder, state, manifest
    return None


def newest_trusted_uri(run_uri: str) -> str | None:
    """The folder `load_newest_trusted` would load (downloaded and verified here once)."""
    found = load_newest_trusted(run_uri)
    return found[0] if found else None


def upload_checkpoint(local_folder: str, dest_uri: str) -> None:
    """Copy a local checkpoint folder to storage: data files first, the manifest last."""
    names = sorted(n for n in os.listdir(local_folder) if n != MANIFEST_FILE)
    for name in names + [MANIFEST_FILE]:
        storage.upload_file(os.path.join(local_folder, name), storage.join(dest_uri, name))


def save_to_storage(local_folder: str, run_uri: str, step: int, num_to_keep: int) -> str:
    """Upload a checkpoint written by `checkpoint.save_checkpoint` under a new name, then prune.
    Returns its folder URI."""
    dest = storage.join(run_uri, folder_name(step))
    upload_checkpoint(local_folder, dest)
    prune(run_uri, num_to_keep, keep=dest)
    return dest


def prune(run_uri: str, num_to_keep: int, keep: str | None = None) -> list[str]:
    """Delete the oldest listed checkpoints beyond the newest `num_to_keep` (never `keep`, the one
    just written). Folders that are not listed (unfinished or failing their size check) are left
    alone here. Returns what was deleted."""
    listed = [folder for _, folder in candidates(run_uri)]
    others = [folder for folder in listed if folder != keep]
    spare = max(num_to_keep - (keep in listed), 0)  # how many of the others stay
    doomed = others[:len(others) - spare]
    for folder in doomed:
        storage.rm(folder)
    return doomed


def remove_incomplete(run_uri: str) -> list[str]:
    """Delete checkpoint folders without a manifest (a crash mid-upload); call only while no training
    of this run is writing. Returns what was removed."""
    removed = []
    for folder in _folders(run_uri):
        # An empty folder is what some S3 servers (SeaweedFS) keep listing after its files are deleted.
        if not storage.exists(storage.join(folder, MANIFEST_FILE)) and storage.ls(folder):
            storage.rm(folder)
            removed.append(folder)
    if removed:
        log.warning("removed %d unfinished checkpoint folder(s) (no manifest): %s", len(removed), removed)
    return removed
