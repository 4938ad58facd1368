"""Raw image-text shards in img2dataset's layouts: writers (ingest) and tolerant readers (encode).

Why img2dataset's layout: it is what people already have on S3 for LAION-style data, so the encode
stage can read their shards as well as ours. Two layouts:

* webdataset: ``00000.tar`` ... each holding ``{key}.png|jpg``, ``{key}.txt`` (caption) and
  ``{key}.json`` (key, caption, status, width, height, plus source metadata), with a
  ``00000_stats.json`` beside each tar;
* parquet: ``00000.parquet`` ... with columns ``key``, ``caption`` and the image bytes in a column
  named after the format (``jpg`` by default, as img2dataset does).

Writers build each shard in memory and store it with ONE `storage.write_bytes` (an object PUT, or a
temp file + rename locally), so a crash never leaves a half-written shard under the final name.
The stats file is written after its shard; readers only list the shards.

Readers never raise on bad content: every problem becomes a record with a `reason` (see
`schema.RawRecord`), so encode can turn each one into a reject row with a key and a reason. A shard
that cannot be parsed at all yields a single marker record whose key is the shard URI.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.data import schema
from pipeline.data.schema import RawRecord

# What the writers accept: the sources' (key, image_bytes, caption, meta) tuples, or dicts with
# key / image / caption and optionally ext / meta.
InputRecord = tuple[str, bytes, str, Mapping[str, Any]] | Mapping[str, Any]

FORMATS = {"webdataset": schema.TAR_SUFFIX, "tar": schema.TAR_SUFFIX, "parquet": schema.PARQUET_SUFFIX}
_TAR_MTIME = 0  # fixed member times: the same records give byte-identical shards


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def shard_name(index: int, suffix: str) -> str:
    return f"{index:0{schema.SHARD_NAME_WIDTH}d}{suffix}"


def sniff_image_ext(data: bytes | None) -> str:
    """'jpg', 'png' or 'webp' from the magic bytes; 'png' when unknown (the bytes are kept as they
    are, and decode will reject them later if they are not an image)."""
    if data:
        if data[:3] == b"\xff\xd8\xff":
            return "jpg"
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return "png"
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return "webp"
    return "png"


def _normalize(record: InputRecord) -> tuple[str, bytes | None, str | None, str, dict[str, Any]]:
    if isinstance(record, Mapping):
        key = record[schema.KEY]
        image = record.get(schema.IMAGE)
        caption = record.get(schema.CAPTION)
        ext = record.get(schema.EXT) or sniff_image_ext(image)
        meta = dict(record.get(schema.META) or {})
    else:
        key, image, caption, meta_in = record
        ext = sniff_image_ext(image)
        meta = dict(meta_in or {})
    key = str(key)
    if not key or "." in key or "/" in key or key.strip() != key:
        raise ValueError(f"bad sample key {key!r}: must be non-empty, without '.', '/' or surrounding spaces")
    ext = ext.lower().lstrip(".")
    if ext == "jpeg":
        ext = "jpg"
    return key, image, caption, ext, meta


def _image_size(data: bytes | None) -> tuple[int, int] | None:
    """(width, height) from the header only; None if it is not a readable image."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return None


def _sample_json(key: str, caption: str | None, image: bytes | None, meta: dict[str, Any]) -> dict[str, Any]:
    """img2dataset-like per-sample metadata: the source's meta plus key, caption, status, size."""
    out = dict(meta)
    out.update({"key": key, "caption": caption, "status": "success", "error_message": None})
    size = _image_size(image)
    if size is not None:
        out["width"], out["height"] = size
    return out


def _batches(records: Iterable[InputRecord], shard_size: int) -> Iterator[list[InputRecord]]:
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    batch: list[InputRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) == shard_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stats(count: int, start: float, end: float) -> dict[str, Any]:
    """img2dataset's {shard}_stats.json fields (our writers have no download/resize failures)."""
    return {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": round(end - start, 6),
        "start_time": start,
        "end_time": end,
        "status_dict": {"success": count},
    }


class _KeyChecker:
    """Rejects duplicate keys across all shards of one write: the reader groups tar members by key,
    so two samples with one key would silently merge."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, key: str) -> None:
        if key in self.seen:
            raise ValueError(f"duplicate sample key {key!r}")
        self.seen.add(key)


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------

def _add_member(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = _TAR_MTIME
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(payload))


def build_tar(samples: Iterable[tuple[str, bytes | None, str | None, str, dict[str, Any]]]) -> bytes:
    """One webdataset tar in memory from normalised (key, image, caption, ext, meta) samples. A None
    image or caption leaves that member out (useful to build faulty shards in tests)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for key, image, caption, ext, meta in samples:
            if image is not None:
                _add_member(tf, f"{key}.{ext}", bytes(image))
            if caption is not None:
                _add_member(tf, f"{key}.{schema.CAPTION_EXT}", caption.encode("utf-8"))
            body = json.dumps(_sample_json(key, caption, image, meta), sort_keys=True, default=str, ensure_ascii=False)
            _add_member(tf, f"{key}.{schema.META_EXT}", body.encode("utf-8"))
    return buf.getvalue()


def write_webdataset_shards(
    records: Iterable[InputRecord], out_uri: str, shard_size: int, start_index: int = 0
) -> dict[str, Any]:
    """Write `records` as 00000.tar, 00001.tar, ... (+ NNNNN_stats.json) under `out_uri`.

    Returns {"format": "webdataset", "num_shards": int, "num_records": int, "num_bytes": int,
    "shards": [uri, ...], "counts": [records per shard, ...]}. Streams: holds one shard in memory.
    Raises ValueError for bad or duplicate keys (these are our inputs, not web data).
    """
    storage.makedirs(out_uri)
    check_key = _KeyChecker()
    shards: list[str] = []
    counts: list[int] = []
    total_bytes = 0
    for i, batch in enumerate(_batches(records, shard_size)):
        start = time.time()
        samples = [_normalize(r) for r in batch]
        for s in samples:
            check_key(s[0])
        data = build_tar(samples)
        uri = storage.join(out_uri, shard_name(start_index + i, schema.TAR_SUFFIX))
        storage.write_bytes(uri, data)
        storage.write_json(
            storage.join(out_uri, shard_name(start_index + i, schema.STATS_SUFFIX)),
            _stats(len(samples), start, time.time()),
        )
        shards.append(uri)
        counts.append(len(samples))
        total_bytes += len(data)
    return {
        "format": "webdataset",
        "num_shards": len(shards),
        "num_records": sum(counts),
        "num_bytes": total_bytes,
        "shards": shards,
        "counts": counts,
    }


def write_parquet_shards(
    records: Iterable[InputRecord],
    out_uri: str,
    shard_size: int,
    image_col: str = schema.PARQUET_IMAGE_COL,
    caption_col: str = schema.PARQUET_CAPTION_COL,
    start_index: int = 0,
) -> dict[str, Any]:
    """Write `records` as 00000.parquet, ... with columns key, caption_col, image_col (binary).

    Same return shape as `write_webdataset_shards` with "format": "parquet". Per-sample meta is not
    stored (img2dataset's parquet output carries only its own fields).
    """
    storage.makedirs(out_uri)
    check_key = _KeyChecker()
    arrow_schema = pa.schema(
        [(schema.PARQUET_KEY_COL, pa.string()), (caption_col, pa.string()), (image_col, pa.binary())]
    )
    shards: list[str] = []
    counts: list[int] = []
    total_bytes = 0
    for i, batch in enumerate(_batches(records, shard_size)):
        start = time.time()
        samples = [_normalize(r) for r in batch]
        for s in samples:
            check_key(s[0])
        table = pa.table(
            {
                schema.PARQUET_KEY_COL: [s[0] for s in samples],
                caption_col: [s[2] for s in samples],
                image_col: [None if s[1] is None else bytes(s[1]) for s in samples],
            },
            schema=arrow_schema,
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        uri = storage.join(out_uri, shard_name(start_index + i, schema.PARQUET_SUFFIX))
        storage.write_bytes(uri, data)
        storage.write_json(
            storage.join(out_uri, shard_name(start_index + i, schema.STATS_SUFFIX)),
            _stats(len(samples), start, time.time()),
        )
        shards.append(uri)
        counts.append(len(samples))
        total_bytes += len(data)
    return {
        "format": "parquet",
        "num_shards": len(shards),
        "num_records": sum(counts),
        "num_bytes": total_bytes,
        "shards": shards,
        "counts": counts,
    }


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------

def _record(key: str, source: str, reason: str | None = None) -> RawRecord:
    return {
        schema.KEY: key,
        schema.IMAGE: None,
        schema.CAPTION: None,
        schema.EXT: None,
        schema.META: None,
        schema.SOURCE: source,
        schema.REASON: reason,
    }


def _shard_marker(source: str, code: str, detail: object | None = None) -> RawRecord:
    """The record standing for a whole shard (or its unreadable tail): key is the shard URI."""
    return _record(source, source, schema.make_reason(code, detail))


def split_member_name(name: str) -> tuple[str, str] | None:
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'), webdataset's rule: the key is the path up
    to the first '.' of the base name. None for names without an extension or hidden files."""
    directory, base = posixpath.split(name)
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    if not stem:
        return None
    key = posixpath.join(directory, stem) if directory else stem
    return key, ext.lower()


def _set_reason(rec: RawRecord, reason: str) -> None:
    if rec[schema.REASON] is None:  # the first problem found is the one reported
        rec[schema.REASON] = reason


def _take_member(rec: RawRecord, ext: str, payload: bytes) -> None:
    if ext in schema.IMAGE_EXTS:
        if rec[schema.IMAGE] is not None:
            _set_reason(rec, schema.make_reason(schema.REASON_DUPLICATE_KEY, f"second image member .{ext}"))
            return
        rec[schema.IMAGE] = payload
        rec[schema.EXT] = "jpg" if ext == "jpeg" else ext
    elif ext == schema.CAPTION_EXT:
        if rec[schema.CAPTION] is not None:
            _set_reason(rec, schema.make_reason(schema.REASON_DUPLICATE_KEY, "second caption member"))
            return
        try:
            rec[schema.CAPTION] = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            _set_reason(rec, schema.make_reason(schema.REASON_CAPTION_NOT_UTF8, e))
    elif ext == schema.META_EXT:
        try:
            meta = json.loads(payload.decode("utf-8"))
            rec[schema.META] = meta if isinstance(meta, dict) else None
        except (UnicodeDecodeError, ValueError):
            rec[schema.META] = None  # metadata is optional: a broken .json does not reject the sample
    # other members (.npy, .cls, ...) are ignored


def read_webdataset_shard(tar_bytes: bytes, source: str) -> list[RawRecord]:
    """Parse one webdataset tar into raw records, in member order, grouped by key.

    Never raises on bad content. Per sample: a missing .txt leaves caption None, a missing image
    leaves image None (decode.check_record turns those into reasons); a caption that is not UTF-8
    or a member whose bytes cannot be read sets `reason`. Whole shard: an unparsable tar gives one
    marker record (key = `source`, reason "corrupt_shard: ..."); a tar that breaks part-way keeps
    the samples read so far and appends such a marker for the lost tail.
    """
    groups: dict[str, RawRecord] = {}
    try:
        tf = tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:")
    except Exception as e:
        return [_shard_marker(source, schema.REASON_CORRUPT_SHARD, e)]
    tail_problem: str | None = None
    with tf:
        while True:
            try:
                member = tf.next()
            except Exception as e:
                tail_problem = schema.make_reason(schema.REASON_CORRUPT_SHARD, e)
                break
            if member is None:
                break
            if not member.isfile():
                continue
            parsed = split_member_name(member.name)
            if parsed is None:
                continue
            key, ext = parsed
            rec = groups.get(key)
            if rec is None:
                rec = groups[key] = _record(key, source)
            try:
                handle = tf.extractfile(member)
                payload = handle.read() if handle is not None else b""
                if len(payload) != member.size:
                    raise tarfile.ReadError(f"short read: {len(payload)} of {member.size} bytes")
            except Exception as e:
                _set_reason(rec, schema.make_reason(schema.REASON_UNREADABLE_MEMBER, f"{member.name}: {e}"))
                continue
            _take_member(rec, ext, payload)
        if tail_problem is None:
            # tarfile stops silently at a damaged header after the first one: whatever follows the
            # last member must be the end-of-archive zero blocks (at least two of 512 bytes).
            rest = tar_bytes[tf.offset:]
            if rest.strip(b"\0"):
                tail_problem = schema.make_reason(
                    schema.REASON_CORRUPT_SHARD, f"unreadable data after byte {tf.offset}"
                )
            elif len(rest) < 2 * tarfile.BLOCKSIZE and groups:
                tail_problem = schema.make_reason(schema.REASON_CORRUPT_SHARD, "truncated: no end-of-archive marker")
    records = list(groups.values())
    if tail_problem is not None:
        records.append(_record(source, source, tail_problem))
    return records


def read_parquet_shard(
    parquet_bytes: bytes,
    source: str,
    image_col: str = schema.PARQUET_IMAGE_COL,
    caption_col: str = schema.PARQUET_CAPTION_COL,
    key_col: str = schema.PARQUET_KEY_COL,
) -> list[RawRecord]:
    """Parse one img2dataset-style parquet shard into raw records; never raises on bad content.

    If `image_col` is absent, the first of png/jpg/jpeg/webp present is used. A missing key becomes
    "{source}#{row}". An unreadable file or missing columns give one marker record (key = source).
    """
    try:
        table = pq.read_table(io.BytesIO(parquet_bytes))
    except Exception as e:
        return [_shard_marker(source, schema.REASON_CORRUPT_SHARD, e)]
    names = set(table.column_names)
    if image_col not in names:
        image_col = next((c for c in schema.IMAGE_EXTS if c in names), image_col)
    missing = [c for c in (image_col, caption_col) if c not in names]
    if missing:
        return [_shard_marker(source, schema.REASON_CORRUPT_SHARD, f"missing columns {missing}")]
    keys = table.column(key_col).to_pylist() if key_col in names else [None] * table.num_rows
    captions = table.column(caption_col).to_pylist()
    images = table.column(image_col).to_pylist()
    ext = "jpg" if image_col == "jpeg" else image_col
    records: list[RawRecord] = []
    for row, (key, caption, image) in enumerate(zip(keys, captions, images)):
        rec = _record(str(key) if key is not None else f"{source}#{row}", source)
        if isinstance(image, str):  # a string column holding image data: not something we can trust
            image = None
        rec[schema.IMAGE] = image
        rec[schema.EXT] = ext if image is not None else None
        if caption is not None and not isinstance(caption, (str, bytes)):
            caption = str(caption)
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError as e:
                _set_reason(rec, schema.make_reason(schema.REASON_CAPTION_NOT_UTF8, e))
                caption = None
        rec[schema.CAPTION] = caption
        records.append(rec)
    return records


def list_shards(uri: str, fmt: str = "webdataset") -> list[str]:
    """Sorted URIs of the shards (*.tar for "webdataset"/"tar", *.parquet for "parquet") directly
    under `uri`; a URI that is itself a shard is returned alone. Temp files of interrupted local
    writes (NNNNN.tar.tmp-xxxx) are not shards and are skipped."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown shard format {fmt!r}: expected one of {', '.join(FORMATS)}")
    suffix = FORMATS[fmt]
    if uri.rstrip("/").endswith(suffix):
        return [storage.normalize(uri)] if storage.exists(uri) else []
    return sorted(u for u in storage.ls(uri) if u.endswith(suffix))


def read_shard(uri: str, fmt: str = "webdataset", **opts: Any) -> list[RawRecord]:
    """Read one shard through storage and parse it. I/O errors (missing object, network) raise, so
    the caller can retry; bad content never does."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown shard format {fmt!r}: expected one of {', '.join(FORMATS)}")
    data = storage.read_bytes(uri)
    if FORMATS.get(fmt) == schema.PARQUET_SUFFIX:
        return read_parquet_shard(data, uri, **opts)
    return read_webdataset_shard(data, uri)
