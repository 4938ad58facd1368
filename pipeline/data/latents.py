"""A committed latent dataset, read back verified: its manifest and null text against the hashes in
`_COMMITTED`, its parquet files exactly as `_COMMITTED` lists them (pipeline/data/encode.py writes it)."""

from __future__ import annotations

import io
import json

import numpy as np

from pipeline import storage


def read_committed(latents_uri: str, name: str) -> bytes:
    """A small file of a committed latent dataset, checked against the hash in its `_COMMITTED`."""
    if not storage.is_committed(latents_uri):
        raise FileNotFoundError(f"no committed latent dataset at {latents_uri}: run `python -m jobs.encode` first")
    want = storage.read_json(storage.join(latents_uri, storage.COMMIT_MARKER)).get("sha256", {}).get(name)
    data = storage.read_bytes(storage.join(latents_uri, name))
    if want is None or storage.sha256_bytes(data) != want:
        raise storage.CorruptArtifact(
            f"{latents_uri}/{name} does not match the sha256 in its {storage.COMMIT_MARKER} (corrupted, or "
            "written by an older version): delete the folder and run `python -m jobs.encode` again"
        )
    return data


def file_sizes(prefix: str) -> dict[str, int]:
    return {uri.rstrip("/").rsplit("/", 1)[-1]: storage.size(uri) for uri in storage.ls(prefix)}


def committed_files(latents_uri: str, split: str) -> list[str]:
    """The latent parquet files of a split exactly as `_COMMITTED` lists them (name and size): a file
    lost, truncated or added since is a CorruptArtifact, so training never reads another dataset."""
    marker = storage.read_json(storage.join(latents_uri, storage.COMMIT_MARKER))
    want = (marker.get("files") or {}).get(split)
    if want is None:
        raise storage.CorruptArtifact(
            f"{latents_uri}: its {storage.COMMIT_MARKER} lists no {split} files (written by an older version): "
            "delete the folder and run `python -m jobs.encode` again")
    have = file_sizes(storage.join(latents_uri, split))
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))
        raise storage.CorruptArtifact(f"{latents_uri}/{split}: files differ from {storage.COMMIT_MARKER}: {diff[:5]}")
    return [storage.join(latents_uri, split, name) for name in sorted(want)]


def read_latents(latents_uri: str, split: str, columns: list[str]):
    """A pyarrow Table of the split's committed latent files (exactly those `_COMMITTED` lists)."""
    import pyarrow.parquet as pq

    files = committed_files(latents_uri, split)
    if not files:
        raise FileNotFoundError(f"{latents_uri}: the {split} split has no encoded rows")
    fs, _ = storage.pyarrow_fs(files[0])
    with storage.translate_errors("read", storage.join(latents_uri, split)):
        return pq.ParquetDataset([storage.pyarrow_fs(f)[1] for f in files], filesystem=fs).read(columns=columns)


def numpy_column(table, name: str, shape, dtype) -> np.ndarray:
    """A parquet column of fixed-shape arrays (Ray's tensor type or nested lists) as one N x shape array."""
    import pyarrow as pa

    arr = table.column(name).combine_chunks()
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(table), *shape)


def load_null_text(latents_uri: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(read_committed(latents_uri, "null_text.npz")), allow_pickle=False) as z:
        return z["emb"], z["mask"]


def load_manifest(latents_uri: str) -> dict:
    return json.loads(read_committed(latents_uri, "manifest.json"))
