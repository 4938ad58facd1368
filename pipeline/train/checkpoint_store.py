"""Checkpoints in object storage: the one definition of "trusted" that training and generate share.

A stored checkpoint folder (`<storage>/checkpoints/<run>/checkpoint_<step>/`) is trusted when it passes
`checkpoint.read_manifest` after download: its manifest exists, has this code's format, and every file
it lists has the recorded size and sha256. Listing (`candidates`) checks only the cheap part (manifest
present, sizes); loading (`load_newest_trusted`) verifies the hashes and falls back, loudly, to the
next older candidate when the newest fails. Ray Train's own registry is not consulted: a folder Ray
never registered (the driver died between upload and registration) is trusted by the same rule.

Uploads go files first, manifest last (`upload_checkpoint`, Ray Train's `checkpoint_upload_fn`), so
a reader that finds the manifest in storage finds the whole checkpoint. Folders without a manifest are
never trusted; `fit` deletes them before training starts (`remove_incomplete`).
"""

from __future__ import annotations

import logging
import os
import tempfile

from pipeline import storage
from pipeline.train.checkpoint import (
    MANIFEST_FILE,
    IncompleteCheckpoint,
    check_manifest_format,
    load_checkpoint,
)

log = logging.getLogger(__name__)

PREFIX = "checkpoint_"


def folder_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _folders(run_uri: str) -> list[str]:
    return [u for u in storage.ls(run_uri) if u.rstrip("/").rsplit("/", 1)[-1].startswith(PREFIX)]


def candidates(run_uri: str) -> list[tuple[int, str]]:
    """(step, folder) of checkpoints under `run_uri` whose manifest exists, has this format and whose
    files have the recorded sizes; oldest first. Hashes are checked on load."""
    found = []
    for folder in _folders(run_uri):
        manifest_uri = storage.join(folder, MANIFEST_FILE)
        if not storage.exists(manifest_uri):
            continue  # never completed
        try:
            manifest = storage.read_json(manifest_uri)
            check_manifest_format(manifest, folder)
        except (IncompleteCheckpoint, ValueError) as e:
            log.error("checkpoint %s is not trusted: %s", folder, e)
            continue
        sizes_ok = all(storage.size(storage.join(folder, name)) == f["size"] for name, f in manifest["files"].items())
        if sizes_ok:
            found.append((int(manifest["step"]), folder))
        else:
            log.error("checkpoint %s is not trusted: a file is missing or has another size than its manifest says", folder)
    return sorted(found)


def fetch(folder_uri: str, local_dir: str, map_location="cpu") -> tuple[dict, dict]:
    """Download a stored checkpoint into `local_dir` and load it, verified (IncompleteCheckpoint if not)."""
    return load_checkpoint(storage.download_dir(folder_uri, local_dir), map_location=map_location)


def load_newest_trusted(run_uri: str, map_location="cpu") -> tuple[str, dict, dict] | None:
    """(folder, state, manifest) of the newest checkpoint under `run_uri` that verifies, or None.
    A newer one that fails verification is reported as an error and skipped (never deleted: it is
    evidence; it is also never trusted)."""
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
    """Copy a local checkpoint folder to storage: data files first, the manifest last. Anything
    already at `dest_uri` (a crashed earlier attempt at the same step) is removed first."""
    storage.rm(dest_uri)
    names = sorted(n for n in os.listdir(local_folder) if n != MANIFEST_FILE)
    for name in names + [MANIFEST_FILE]:
        storage.upload_file(os.path.join(local_folder, name), storage.join(dest_uri, name))


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
