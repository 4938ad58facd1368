"""What every built-in dataset shares: the sample tuple, the splits, PNG encoding, a stable hash."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL import Image

Sample = tuple[str, bytes, str, dict[str, Any]]  # (key, png_bytes, caption, meta)
SPLITS: tuple[str, ...] = ("train", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def stable_fraction(text: str) -> float:
    """A number in [0, 1) fixed by `text` alone (unlike hash(), which is salted per process)."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
