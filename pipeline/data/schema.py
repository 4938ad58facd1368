"""Names shared by the ingest and encode stages: shard members, record dicts, table columns.

Kept in one dependency-free module so the writer (ingest), the reader (encode) and the tests agree
on spelling without importing each other. The raw shard layout follows img2dataset, so shards
produced by img2dataset itself (webdataset tar or parquet output) can be fed to encode unchanged.
"""

from __future__ import annotations

from typing import TypedDict

# --- Raw shards (img2dataset layout) -------------------------------------------------------------
# webdataset: NNNNN.tar holding, per sample, {key}.{png|jpg}, {key}.txt (caption), {key}.json (meta);
# next to each tar, NNNNN_stats.json with counts.
# parquet: NNNNN.parquet with columns key, caption and the image bytes in a column named after the ext.

SHARD_NAME_WIDTH = 5  # 00000.tar, 00001.tar, ...
TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
STATS_SUFFIX = "_stats.json"

IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")  # accepted image members, in preference order
CAPTION_EXT = "txt"
META_EXT = "json"

# --- The raw record: what a shard reader yields per sample -----------------------------------------
# {"key": str, "image": bytes | None, "caption": str | None, "ext": str | None,
#  "meta": dict | None, "source": str (shard URI), "reason": str | None}
# `reason` is set when the container itself already shows the sample is bad (corrupt tar, caption not
# UTF-8, unreadable member); otherwise `decode.check_record` decides.
KEY = "key"
IMAGE = "image"
CAPTION = "caption"
EXT = "ext"
META = "meta"
SOURCE = "source"
REASON = "reason"

RAW_RECORD_FIELDS: tuple[str, ...] = (KEY, IMAGE, CAPTION, EXT, META, SOURCE, REASON)

# Parquet raw shards: img2dataset names the image column after the format ("jpg" by default).
PARQUET_KEY_COL = KEY
PARQUET_CAPTION_COL = CAPTION
PARQUET_IMAGE_COL = "jpg"

# --- Reject table: one row per sample (or whole shard) that could not be used ----------------------
# key: the sample key (or the shard URI when the whole shard is unreadable); source: shard URI;
# reason: "<code>" or "<code>: <detail>", see REASON_* below.
REJECT_COLUMNS: tuple[str, ...] = (KEY, SOURCE, REASON)

# --- Decoded records: output of decode, input to the image/text encoders --------------------------
# image: uint8 array H x W x 3 (RGB, H == W == the configured size).
DECODED_COLUMNS: tuple[str, ...] = (KEY, CAPTION, IMAGE)

# --- Reject reason codes (stable; a detail may follow after ": ") --------------------------------
REASON_MISSING_IMAGE = "missing_image"
REASON_MISSING_CAPTION = "missing_caption"
REASON_EMPTY_CAPTION = "empty_caption"
REASON_CAPTION_NOT_UTF8 = "caption_not_utf8"
REASON_UNDECODABLE_IMAGE = "undecodable_image"
REASON_IMAGE_TOO_SMALL = "image_too_small"
REASON_IMAGE_TOO_LARGE = "image_too_large"
REASON_UNSUPPORTED_MODE = "unsupported_image_mode"
REASON_UNREADABLE_MEMBER = "unreadable_member"
REASON_CORRUPT_SHARD = "corrupt_shard"
REASON_DUPLICATE_KEY = "duplicate_key"
REASON_NONFINITE_LATENT = "nonfinite_latent"

REASON_CODES: tuple[str, ...] = (
    REASON_MISSING_IMAGE,
    REASON_MISSING_CAPTION,
    REASON_EMPTY_CAPTION,
    REASON_CAPTION_NOT_UTF8,
    REASON_UNDECODABLE_IMAGE,
    REASON_IMAGE_TOO_SMALL,
    REASON_IMAGE_TOO_LARGE,
    REASON_UNSUPPORTED_MODE,
    REASON_UNREADABLE_MEMBER,
    REASON_CORRUPT_SHARD,
    REASON_DUPLICATE_KEY,
    REASON_NONFINITE_LATENT,
)


def reason_code(reason: str) -> str:
    """The stable part of a reason ("undecodable_image: cannot identify ..." -> "undecodable_image"),
    for grouping rejects in reports."""
    return reason.split(":", 1)[0].strip()


def make_reason(code: str, detail: object | None = None, max_len: int = 200) -> str:
    """'code' or 'code: detail' with the detail flattened to one short line (exception texts can be
    long or multi-line, and reject tables should stay readable)."""
    if detail is None:
        return code
    text = " ".join(str(detail).split())
    if len(text) > max_len:
        text = text[: max_len - 3] + "..."
    return f"{code}: {text}" if text else code


class RawRecord(TypedDict):
    key: str
    image: bytes | None
    caption: str | None
    ext: str | None
    meta: dict | None
    source: str
    reason: str | None
