"""One place that turns a URI (s3://, gs://, local path, file://) into a filesystem.

Every stage reads and writes through these helpers so that s3://, gs:// and local folders behave
the same. Credentials come only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_REGION, GOOGLE_APPLICATION_CREDENTIALS, ...) and are never logged.

Faults (s3://): every request waits at most `io.timeout_s` to connect and for each answer, and is tried
up to `io.max_attempts` times with exponential backoff (503 SlowDown and other throttling, 5xx,
connection resets, timeouts); see `configure`. A request that still fails raises `StorageTimeout`
(the endpoint stalled) or `StorageUnavailable` (it kept failing), both naming the endpoint, the
operation and the URI, never a credential. What each client retries (checked with s3fs 2026.9 /
aiobotocore 3.10 / botocore 1.43 and pyarrow 26):
- s3fs: botocore's "standard" retry mode retries each HTTP request (`total_max_attempts`: 500, 502,
  503, 504, throttling codes such as SlowDown, connection errors, connect and read timeouts); s3fs
  wraps each call in a loop of its own (`retries`: SlowDown, resets, timeouts, truncated bodies), the
  only one that sees a reset or a stall inside an object's body, after botocore returned the headers.
  That loop nests once for a read (around the GET and again around reading its body), so we give it
  `_S3FS_PASSES` = 2 passes, not s3fs's 5: a stall that never ends costs at most 2 x max_attempts x
  timeout_s for a write or a listing and 4 x max_attempts x timeout_s for a read (+ backoff). aiohttp
  also resends an idempotent request once when a reused connection was reset.
- pyarrow (Ray Data, Ray Train): the AWS SDK's standard strategy (`AwsStandardS3RetryStrategy`)
  retries 5xx, SlowDown and network errors, timeouts (curl code 28) included. Ray Data adds its own
  retries of "AWS Error NETWORK_CONNECTION"/"SLOW_DOWN" around that (DataContext.retried_io_errors).
Both clients keep a retry quota (a token bucket): under sustained faults they stop retrying early.
gs:// keeps gcsfs' and pyarrow's own defaults.

Atomicity: an object-store PUT is atomic (readers see the old object or the whole new one), and
local writes go to a temporary name first and are renamed into place. Multi-file artifacts
(checkpoints, latent datasets) are trusted only once their commit marker exists; see
`write_commit_marker` / `is_committed`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import fsspec

COMMIT_MARKER = "_COMMITTED"
_REMOTE_SCHEMES = ("s3", "gs", "gcs")

TIMEOUT_ENV = "RLD_IO_TIMEOUT_S"
ATTEMPTS_ENV = "RLD_IO_MAX_ATTEMPTS"
# Read at call time, so a Ray worker follows the driver's `configure` (cli passes these, and the
# endpoint and region, in the job's runtime_env). Never credentials: they would show in Ray's dashboard.
_WORKER_ENV = (TIMEOUT_ENV, ATTEMPTS_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
# Passes of s3fs's own retry loop around botocore's per-request retries (see the module docstring):
# 2 retries a reset or a stall inside a body once; s3fs's default 5 nests to 25 x max_attempts per read.
_S3FS_PASSES = 2


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


# ------------------------------------------------------------------------------------ I/O settings


def configure(io: Any = None, *, timeout_s: float | None = None, max_attempts: int | None = None) -> None:
    """Set the timeout and attempts of every storage request of this process and of the processes it
    starts: `io` is the config's `io` section (or a dict with its keys); keywords override it.

    They are exported as RLD_IO_TIMEOUT_S / RLD_IO_MAX_ATTEMPTS and read at each call, so filesystems
    made afterwards use them (s3fs's instance cache is keyed by them: no stale client is reused)."""
    values = dict(io) if isinstance(io, Mapping) else ({"timeout_s": io.timeout_s, "max_attempts": io.max_attempts}
                                                      if io is not None else {})
    if timeout_s is not None:
        values["timeout_s"] = timeout_s
    if max_attempts is not None:
        values["max_attempts"] = max_attempts
    if "timeout_s" in values:
        os.environ[TIMEOUT_ENV] = repr(float(values["timeout_s"]))
    if "max_attempts" in values:
        os.environ[ATTEMPTS_ENV] = str(int(values["max_attempts"]))
    io_settings()  # refuse bad values here, not at the first request


def io_settings() -> tuple[float, int]:
    """(timeout_s, max_attempts) in force: from the environment (see `configure`), else the defaults
    of the config's `io` section."""
    from pipeline.config import IOSection

    defaults = IOSection()
    try:
        timeout_s = float(os.environ.get(TIMEOUT_ENV) or defaults.timeout_s)
        attempts = int(os.environ.get(ATTEMPTS_ENV) or defaults.max_attempts)
    except ValueError as e:
        raise ValueError(f"{TIMEOUT_ENV} / {ATTEMPTS_ENV}: {e}") from None
    if not timeout_s > 0 or attempts < 1:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 and {ATTEMPTS_ENV} >= 1, got {timeout_s} and {attempts}")
    return timeout_s, attempts


def worker_env() -> dict[str, str]:
    """The storage settings a Ray job's workers need to reach the same endpoint with the same limits:
    RLD_IO_*, AWS_ENDPOINT_URL(_S3), AWS_REGION / AWS_DEFAULT_REGION as set here. No credentials (an
    endpoint URL with a user:password part is left out too): runtime_env shows in Ray's dashboard."""
    env = {k: os.environ[k] for k in _WORKER_ENV if os.environ.get(k)}
    return {k: v for k, v in env.items() if not (k.startswith("AWS_ENDPOINT_URL") and "@" in urlparse(v).netloc)}


def _endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def endpoint(uri: str) -> str:
    """The endpoint requests for `uri` go to, for messages: scheme://host[:port], nothing else."""
    if scheme(uri) == "gs":
        return "https://storage.googleapis.com"
    url = _endpoint_url()
    if not url:
        return f"https://s3.{_region()}.amazonaws.com"
    p = urlparse(url if "//" in url else "https://" + url)
    return f"{p.scheme}://{p.hostname}" + (f":{p.port}" if p.port else "")


# --------------------------------------------------------------------------------------- filesystems


def _s3_options() -> dict[str, Any]:
    # s3fs reads keys from the environment itself; only the endpoint needs passing explicitly
    # because not every s3fs/botocore version honours AWS_ENDPOINT_URL.
    timeout_s, attempts = io_settings()
    opts: dict[str, Any] = {
        "config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                          "retries": {"total_max_attempts": attempts, "mode": "standard"}},
    }
    if _endpoint_url():
        opts["endpoint_url"] = _endpoint_url()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it (no scheme). For s3:// it has the `configure`d
    timeout and attempts; errors of direct calls on it are not translated (see `translate_errors`)."""
    s = scheme(uri)
    if s == "file":
        return fsspec.filesystem("file"), normalize(uri)
    parsed = urlparse(uri)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if s == "s3":
        fs = fsspec.filesystem("s3", **_s3_options(), skip_instance_cache=False)
        fs.retries = _S3FS_PASSES  # an attribute, not a constructor argument, in s3fs 2026.9
        return fs, path
    return fsspec.filesystem("gcs"), path


@functools.cache
def _s3_filesystem_class():
    import pyarrow.fs as pafs

    class S3FileSystem(pafs.S3FileSystem):
        """pyarrow's S3FileSystem pickles without its retry strategy (a Ray worker unpickling it would
        get the default 3 attempts): this one carries `max_attempts` through pickling."""

        def __init__(self, max_attempts: int, **kwargs: Any) -> None:
            self.max_attempts = max_attempts
            super().__init__(**kwargs, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts))

        def __reduce__(self):
            _, (options,) = super().__reduce__()  # (no credentials in it unless passed: we pass none)
            return _pyarrow_s3, (options, self.max_attempts)

    return S3FileSystem


def _pyarrow_s3(kwargs: dict[str, Any], max_attempts: int):
    return _s3_filesystem_class()(max_attempts, **kwargs)


def pyarrow_fs(uri: str):
    """A pyarrow filesystem and the path inside it, for pyarrow / Ray Data / Ray Train storage. For
    s3:// it has the `configure`d timeouts and attempts; no credentials are put into it (pyarrow reads
    them from the environment, also after unpickling in a Ray worker). Wrap calls on it in
    `translate_errors` for errors that name the endpoint."""
    import pyarrow.fs as pafs

    s = scheme(uri)
    if s == "file":
        return pafs.LocalFileSystem(), normalize(uri)
    parsed = urlparse(uri)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if s == "s3":
        timeout_s, attempts = io_settings()
        kwargs: dict[str, Any] = {"region": _region(),
                                  "connect_timeout": timeout_s, "request_timeout": timeout_s}
        endpoint_url = _endpoint_url()
        if endpoint_url:
            p = urlparse(endpoint_url)
            kwargs["endpoint_override"] = p.netloc or endpoint_url
            kwargs["scheme"] = p.scheme or "https"
        return _pyarrow_s3(kwargs, attempts), path
    return pafs.GcsFileSystem(), path


def ray_path(uri: str) -> str:
    """The URI form for Ray Data: plain s3:// (pyarrow's fast client), absolute local paths.

    Pass `filesystem=ray_filesystem(uri)` beside it: Ray Data 2.60 accepts a scheme-ful URI with an
    explicit pyarrow filesystem (it strips the scheme itself), and without one it would build a default
    S3FileSystem (AWS SDK default timeouts, 3 attempts) from the URI. Ray Train is different: see
    `train_storage_path`."""
    return normalize(uri)


def ray_filesystem(uri: str):
    """The `configure`d pyarrow filesystem for a remote URI (for Ray Data's `filesystem=` and Ray Train's
    `storage_filesystem=`), None for a local path (Ray then uses its local filesystem)."""
    return pyarrow_fs(uri)[0] if is_remote(uri) else None


def train_storage_path(uri: str) -> str:
    """Ray Train's `storage_path` to go with `storage_filesystem=ray_filesystem(uri)`: with a custom
    filesystem Ray Train 2.60 takes the path as is, so it must be prefix-stripped (bucket/prefix);
    an absolute path locally."""
    return pyarrow_fs(uri)[1] if is_remote(uri) else normalize(uri)


# ------------------------------------------------------------------------------------------- errors


class StorageUnavailable(OSError):
    """The storage endpoint kept failing a request (503 SlowDown, resets, refused connections) through
    every attempt. Attributes: `endpoint`, `operation`, `uri`."""

    def __init__(self, message: str, endpoint: str = "", operation: str = "", uri: str = "") -> None:
        super().__init__(message)
        self.endpoint, self.operation, self.uri = endpoint, operation, uri


class StorageTimeout(StorageUnavailable, TimeoutError):
    """The storage endpoint did not connect or answer within io.timeout_s, io.max_attempts times."""


_TIMEOUT_NAMES = {"ReadTimeoutError", "ConnectTimeoutError", "AioReadTimeoutError"}  # botocore, aiobotocore
_CONNECTION_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ResponseStreamingError",
                     "ClientPayloadError", "ClientConnectionError", "ServerDisconnectedError", "IncompleteRead"}
_BUSY_CODES = {"SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException", "RequestLimitExceeded",
               "InternalError", "503", "500"}


def _fault_kind(exc: BaseException) -> str | None:
    """'timeout', 'unavailable' or None (anything else: missing objects, denied access, bad input...),
    looking through the chain of causes (s3fs and fsspec re-raise botocore's and aiohttp's errors)."""
    seen = 0
    kind = None
    while exc is not None and seen < 10:
        names = {c.__name__ for c in type(exc).__mro__}
        text = str(exc)
        if isinstance(exc, TimeoutError) or names & _TIMEOUT_NAMES or "curlCode: 28" in text:
            return "timeout"  # (pyarrow: the AWS SDK's curl reports a stall as code 28)
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            return None
        response = getattr(exc, "response", None)
        code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        if (isinstance(exc, ConnectionError) or names & _CONNECTION_NAMES or code in _BUSY_CODES
                or any(f"AWS Error {m}" in text for m in ("NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE"))):
            kind = "unavailable"
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return kind


@contextlib.contextmanager
def translate_errors(operation: str, uri: str) -> Iterator[None]:
    """Turn a stall into StorageTimeout and a request that kept failing into StorageUnavailable, both
    naming the endpoint, `operation` and `uri`; other errors (FileNotFoundError...) pass unchanged.
    The helpers below use it; wrap direct s3fs/pyarrow calls in it too."""
    try:
        yield
    except StorageUnavailable:
        raise
    except Exception as e:
        kind = _fault_kind(e) if is_remote(uri) else None
        if kind is None:
            raise
        timeout_s, attempts = io_settings()
        where = endpoint(uri)
        if kind == "timeout":
            raise StorageTimeout(
                f"storage endpoint {where} did not answer within {timeout_s:g} s ({operation} {uri}); "
                f"{attempts} attempts per request, all timed out (io.timeout_s, io.max_attempts; {type(e).__name__})",
                where, operation, uri) from e
        raise StorageUnavailable(
            f"storage endpoint {where} failed to {operation} {uri}: {attempts} attempts per request, all "
            f"throttled, 5xx or reset/refused (io.max_attempts; {type(e).__name__})",
            where, operation, uri) from e


def _guarded(operation: str, uri_arg: int = 0):
    """`translate_errors` around a helper whose argument `uri_arg` is the URI."""

    def wrap(func):
        @functools.wraps(func)
        def guarded(*args, **kwargs):
            with translate_errors(operation, args[uri_arg]):
                return func(*args, **kwargs)

        return guarded

    return wrap


@_guarded("check")
def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


@_guarded("list")
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


@_guarded("stat")
def size(uri: str) -> int | None:
    """Size in bytes, or None if missing."""
    fs, path = fs_and_path(uri)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None


@_guarded("read")
def read_bytes(uri: str) -> bytes:
    # One whole-object GET (cat_file), not open() + read(): the latter pins the ETag of a HEAD and
    # fails with FileExpired when a writer replaces the object in between (a polled metrics file).
    fs, path = fs_and_path(uri)
    return fs.cat_file(path)


@_guarded("write")
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


@_guarded("upload to", uri_arg=1)
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


@_guarded("download")
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


@_guarded("delete")
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


@_guarded("create the bucket of")
def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI if it is missing (local servers start empty)."""
    if scheme(uri) != "s3":
        return
    fs, path = fs_and_path(uri)
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
