"""One place that turns a URI (s3://, gs://, local path, file://) into a filesystem.

Every stage reads and writes through these helpers so that s3://, gs:// and local folders behave
the same. Credentials come only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_REGION, GOOGLE_APPLICATION_CREDENTIALS, ...) and are never logged.

Atomicity: an object-store PUT is atomic (readers see the old object or the whole new one), and
local writes go to a temporary name first and are renamed into place. Multi-file artifacts
(checkpoints, latent datasets) are trusted only once their commit marker exists; see
`write_commit_marker` / `is_committed`.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any
from urllib.parse import urlparse

import fsspec

COMMIT_MARKER = "_COMMITTED"
_REMOTE_SCHEMES = ("s3", "gs", "gcs")


def scheme(uri: str) -> str:
    """'s3', 'gs', or 'file' for local paths."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # 1 letter: a Windows drive
        return "file"
    if parsed.scheme == "gcs":
        return "gs"
    if parsed.scheme not in _REMOTE_SCHEMES:
        raise ValueError(f"unsupported storage URI {uri!r}: use s3://, gs://, file:// or a local path")
    return parsed.scheme


def is_remote(uri: str) -> bool:
    return scheme(uri) != "file"


def normalize(uri: str) -> str:
    """Local paths become absolute (so Ray workers on this node agree); remote URIs are kept."""
    if is_remote(uri):
        return uri.rstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(normalize(uri), *parts)


def _s3_options() -> dict[str, Any]:
    # s3fs reads keys from the environment itself; only the endpoint needs passing explicitly
    # because not every s3fs/botocore version honours AWS_ENDPOINT_URL.
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    opts: dict[str, Any] = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it (no scheme)."""
    s = scheme(uri)
    if s == "file":
        return fsspec.filesystem("file"), normalize(uri)
    parsed = urlparse(uri)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if s == "s3":
        return fsspec.filesystem("s3", **_s3_options(), skip_instance_cache=False), path
    return fsspec.filesystem("gcs"), path


def pyarrow_fs(uri: str):
    """A pyarrow filesystem and the path inside it, for pyarrow / Ray Data / Ray Train storage."""
    import pyarrow.fs as pafs

    s = scheme(uri)
    if s == "file":
        return pafs.LocalFileSystem(), normalize(uri)
    parsed = urlparse(uri)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if s == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION", "us-east-1")}
        if endpoint:
            p = urlparse(endpoint)
            kwargs["endpoint_override"] = p.netloc or endpoint
            kwargs["scheme"] = p.scheme or "https"
        return pafs.S3FileSystem(**kwargs), path
    return pafs.GcsFileSystem(), path


def ray_path(uri: str) -> str:
    """The URI form Ray Data / Ray Train want: plain s3:// (pyarrow's fast client), absolute local."""
    return normalize(uri)


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


def ls(uri: str) -> list[str]:
    """Full URIs of the entries directly under `uri` (empty if it does not exist)."""
    fs, path = fs_and_path(uri)
    if not fs.exists(path):
        return []
    entries = fs.ls(path, detail=False, refresh=True) if is_remote(uri) else fs.ls(path, detail=False)
    # Some S3 servers list an emptied folder as an entry of itself: not a child.
    return sorted(_with_scheme(uri, e) for e in entries if e.rstrip("/") != path.rstrip("/"))


def _with_scheme(uri: str, path: str) -> str:
    s = scheme(uri)
    return path if s == "file" else f"{s}://{path.lstrip('/')}"


def size(uri: str) -> int | None:
    """Size in bytes, or None if missing."""
    fs, path = fs_and_path(uri)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object: atomic on object stores; temp file + rename locally."""
    fs, path = fs_and_path(uri)
    if is_remote(uri):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to `uri` as one object (a multipart upload completes atomically on S3;
    locally a temporary name is renamed into place), without reading it into memory."""
    fs, path = fs_and_path(uri)
    if is_remote(uri):
        fs.put_file(local_path, path)
        return
    import shutil

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, path)


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class CorruptArtifact(RuntimeError):
    """An object read back from storage does not match the sha256 recorded when it was written."""


def write_verified(uri: str, data: bytes) -> None:
    """Write an object, then `<uri>.sha256.json` (its size and sha256) last: `read_verified` trusts
    the object only when both agree."""
    write_bytes(uri, data)
    write_json(uri + ".sha256.json", {"size": len(data), "sha256": sha256_bytes(data)})


def read_verified(uri: str) -> bytes:
    """The object's bytes if they match the hash `write_verified` recorded; CorruptArtifact otherwise
    (also when the record is missing: a write that never finished, or a file from elsewhere)."""
    record_uri = uri + ".sha256.json"
    if not exists(record_uri):
        raise CorruptArtifact(f"{uri}: no {record_uri.rsplit('/', 1)[-1]} beside it; not trusted")
    record = read_json(record_uri)
    data = read_bytes(uri)
    if len(data) != record.get("size") or sha256_bytes(data) != record.get("sha256"):
        raise CorruptArtifact(f"{uri}: its bytes do not match the recorded sha256 (corrupted or replaced)")
    return data


def download_dir(uri: str, local: str) -> str:
    """A local folder holding the storage folder `uri` (copied there if remote); returns its path."""
    fs, path = fs_and_path(uri)
    if not is_remote(uri):
        return path
    fs.get(path.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)
    return local


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        os.makedirs(normalize(uri), exist_ok=True)


def rm(uri: str, recursive: bool = True) -> None:
    fs, path = fs_and_path(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
    if is_remote(uri):
        fs.invalidate_cache(path)  # else s3fs may answer exists() from its listing cache


def write_commit_marker(prefix: str, info: dict | None = None) -> None:
    """Written last: a multi-file artifact under `prefix` is trusted only once this exists."""
    write_json(join(prefix, COMMIT_MARKER), info or {})


def is_committed(prefix: str) -> bool:
    return exists(join(prefix, COMMIT_MARKER))


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI if it is missing (local servers start empty)."""
    if scheme(uri) != "s3":
        return
    fs, path = fs_and_path(uri)
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
