"""Image bytes -> fixed-size RGB array, or a reject with a short reason. Pure: no I/O, no Ray.

Web-scale image-text data is full of broken files; one bad sample must never kill a Ray task. So
`check_record` never raises for bad data: it returns a reason string whose prefix (before ": ") is a
stable code from `schema.REASON_CODES`, which encode writes to the reject table.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps

from pipeline.data import schema

MIN_IMAGE_SIDE = 8  # below this an image carries too little signal to be worth a training slot
# Decompression bombs: Pillow warns above its MAX_IMAGE_PIXELS (about 89 Mpx) and raises above twice
# that. We check the header's size ourselves (no global warning filters: not thread-safe) and make
# the refusal an ordinary reject rather than a crash or an out-of-memory worker.
MAX_IMAGE_PIXELS = 89_478_485
WHITE = (255, 255, 255)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DecodeError(ValueError):
    """A decoding failure carrying a ready-made reject reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparent pixels are composited over WHITE, not black: emoji and
    logos are drawn on transparency, and a plain convert('RGB') would turn their background black
    (or into whatever colour the invisible pixels happen to hold)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit / float greys: convert('L') would clip, not scale, so scale to 8 bits ourselves.
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and arr.max() > 255:
            arr = arr * (255.0 / max(float(arr.max()), 1.0))
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "1":
        img = img.convert("L")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    if img.mode in ("L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        try:
            return img.convert("RGB")
        except (ValueError, OSError) as e:
            raise DecodeError(schema.make_reason(schema.REASON_UNSUPPORTED_MODE, f"{img.mode}: {e}"))
    raise DecodeError(schema.make_reason(schema.REASON_UNSUPPORTED_MODE, img.mode))


def _center_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square (side = short side) in source pixels."""
    side = min(width, height)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    return (left, top, left + side, top + side)


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _describe(e: BaseException) -> str:
    """The exception text without memory addresses, so equal failures give equal reasons."""
    return _OBJECT_REPR.sub("<data>", str(e)) or type(e).__name__


def decode_image(
    data: bytes, size: int, min_side: int = MIN_IMAGE_SIDE, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode `data` and return a uint8 array of shape (size, size, 3), RGB.

    Equivalent to "resize the short side to `size` (Lanczos), then centre-crop", done as one resample
    of the centred square so no pixels are resampled twice. EXIF orientation is applied (phone
    photos are often stored rotated). Raises DecodeError (with `.reason`) on anything bad; use
    `check_record` for the never-raising form.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if not data:
        raise DecodeError(schema.REASON_MISSING_IMAGE)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        if img.width * img.height > max_pixels:
            raise DecodeError(
                schema.make_reason(schema.REASON_IMAGE_TOO_LARGE, f"{img.width}x{img.height} > {max_pixels} px")
            )
        img.load()  # forces full decoding: truncated files fail here, not later
        ImageOps.exif_transpose(img, in_place=True)  # phone photos are often stored rotated
    except Image.DecompressionBombError as e:
        raise DecodeError(schema.make_reason(schema.REASON_IMAGE_TOO_LARGE, e))
    except DecodeError:
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, struct.error...)
        raise DecodeError(schema.make_reason(schema.REASON_UNDECODABLE_IMAGE, _describe(e)))

    width, height = img.size
    if min(width, height) < min_side:
        raise DecodeError(schema.make_reason(schema.REASON_IMAGE_TOO_SMALL, f"{width}x{height} < {min_side}"))
    try:
        rgb = _to_rgb(img)
        out = rgb.resize((size, size), Image.Resampling.LANCZOS, box=_center_square_box(width, height))
        arr = np.asarray(out, dtype=np.uint8)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(schema.make_reason(schema.REASON_UNDECODABLE_IMAGE, _describe(e)))
    if arr.shape != (size, size, 3):  # defensive: should not happen after convert('RGB')
        raise DecodeError(schema.make_reason(schema.REASON_UNDECODABLE_IMAGE, f"unexpected shape {arr.shape}"))
    return arr


def clean_caption(caption: str | bytes | None) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason). Bytes must be UTF-8; surrounding whitespace is dropped and
    inner runs of whitespace (newlines from scraped alt text) become single spaces."""
    if caption is None:
        return None, schema.REASON_MISSING_CAPTION
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, schema.make_reason(schema.REASON_CAPTION_NOT_UTF8, e)
    if not isinstance(caption, str):
        return None, schema.make_reason(schema.REASON_MISSING_CAPTION, f"not text: {type(caption).__name__}")
    text = " ".join(caption.replace("\x00", " ").split())
    if not text:
        return None, schema.REASON_EMPTY_CAPTION
    return text, None


def check_record(
    key: str,
    image_bytes: bytes | None,
    caption: str | bytes | None,
    size: int,
    min_side: int = MIN_IMAGE_SIDE,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[np.ndarray, None] | tuple[None, str]:
    """(array, None) for a usable sample, else (None, reason). Never raises for bad data.

    Order of checks: image present, caption, then the (costly) decode, so a sample with both image
    and caption missing reports "missing_image". `key` is unused by the checks; it is there so call
    sites read naturally and the signature can grow key-based rules.
    """
    del key
    if image_bytes is None or len(image_bytes) == 0:
        return None, schema.REASON_MISSING_IMAGE
    _, reason = clean_caption(caption)
    if reason is not None:
        return None, reason
    try:
        return decode_image(bytes(image_bytes), size, min_side=min_side, max_pixels=max_pixels), None
    except DecodeError as e:
        return None, e.reason
    except Exception as e:  # last line of defence: a bad sample must never kill the task
        return None, schema.make_reason(schema.REASON_UNDECODABLE_IMAGE, f"{type(e).__name__}: {e}")
