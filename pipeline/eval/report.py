"""Pictures for people: PNG encoding and sample grids."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 HxWx3 (or HxW) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def spread_pick(prompts: list[str], k: int) -> list[int]:
    """Up to k indices for a sample grid: one image per distinct prompt first, evenly spaced over the
    run's distinct prompts, then (when there are fewer than k) more images evenly spaced over the rest.
    Sorted. Prompts arrive grouped (by key, so by category or emoji), which makes the first k, or even
    an even spacing, show the same few prompts again and again."""
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    distinct = sorted(first.values())

    def spaced(items: list[int], n: int) -> list[int]:
        if n <= 0 or not items:
            return []
        return [items[j] for j in np.unique(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int))]

    pick = spaced(distinct, k)
    chosen = set(pick)
    pick += spaced([i for i in range(len(prompts)) if i not in chosen], k - len(pick))
    return sorted(pick)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """uint8 NxHxWx3 -> one uint8 image with the tiles on a white background, row by row."""
    n, h, w, c = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


# --------------------------------------------------------------------------------------------
# Charts, captioned grids, tables and a markdown report (pure functions; I/O via pipeline.storage)
# --------------------------------------------------------------------------------------------

# matplotlib's tab10: distinct, colour-blind tolerable, readable on white.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
_BLACK, _GREY, _GRID, _WHITE = (0, 0, 0), (90, 90, 90), (228, 228, 228), (255, 255, 255)


def _font(size: float):
    """PIL's default font, scaled when FreeType is available (a fixed bitmap font otherwise)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except Exception:  # no FreeType: the bitmap font has one size
        return ImageFont.load_default()


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})


def drawable(text: str) -> str:
    """`text` in the ASCII that PIL's default font has glyphs for: accents dropped (Côte -> Cote),
    typographic quotes and dashes made plain, anything else '?' (it would draw as an empty box)."""
    import unicodedata

    text = unicodedata.normalize("NFKD", text.translate(_QUOTES))
    text = "".join(c for c in text if not unicodedata.combining(c))
    return "".join(c if c.isascii() else "?" for c in text)


def _text_size(draw, text: str, font) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), drawable(text), font=font)
    return r - l, b - t


def _draw_text(draw, xy: tuple[float, float], text: str, font, fill=_BLACK, anchor: str = "la") -> None:
    draw.text(xy, drawable(text), fill=fill, font=font, anchor=anchor)


def _nice_step(span: float, target: int) -> float:
    raw = span / max(1, target)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10.0 * mag


def _linear_ticks(lo: float, hi: float, target: int = 6) -> tuple[float, float, list[float]]:
    """A 'nice' axis range covering [lo, hi] and the ticks on it."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        half = abs(lo) * 0.1 or 0.5
        lo, hi = lo - half, hi + half
    step = _nice_step(hi - lo, target)
    start, end = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    n = int(round((end - start) / step))
    ticks = [start + i * step for i in range(n + 1)]
    return start, end, [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def _log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Axis range in log10 units (the data's, padded a little) and the tick values on it:
    1-2-5 multiples for up to ~2.5 decades, decades (thinned to at most 8) beyond."""
    llo, lhi = math.log10(lo), math.log10(hi)
    if lhi - llo < 1e-12:
        llo, lhi = llo - 0.5, lhi + 0.5
    pad = 0.04 * (lhi - llo)
    llo, lhi = llo - pad, lhi + pad
    d0, d1 = math.floor(llo), math.ceil(lhi)
    mults = (1, 2, 5) if lhi - llo <= 2.5 else (1,)
    cands = [m * 10.0 ** d for d in range(d0, d1 + 1) for m in mults]
    ticks = [t for t in cands if llo - 1e-9 <= math.log10(t) <= lhi + 1e-9]
    if len(ticks) > 8:
        every = math.ceil(len(ticks) / 8)
        ticks = ticks[::every]
    if len(ticks) < 2:  # a narrow range between two 1-2-5 values: widen to the neighbours
        lo_t = max([t for t in cands if math.log10(t) <= llo] or [10.0 ** d0])
        hi_t = min([t for t in cands if math.log10(t) >= lhi] or [10.0 ** d1])
        llo, lhi = min(llo, math.log10(lo_t)), max(lhi, math.log10(hi_t))
        ticks = [t for t in cands if llo - 1e-9 <= math.log10(t) <= lhi + 1e-9]
    return llo, lhi, ticks


def _fmt_tick(v: float, step: float | None = None) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        s = f"{v:.2e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")
        mant, exp = s.split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{exp}"
    if step is not None and step > 0:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        if abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:  # e.g. 2.5 steps
            decimals += 1
        return f"{v:.{decimals}f}"
    return f"{v:.4g}"


def _finite_points(points) -> list[tuple[float, float]]:
    out = []
    for p in points or []:
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            continue
        out.append((x, y))
    return out


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 640,
    height: int = 360,
    log_y: bool = False,
) -> np.ndarray:
    """A line chart as uint8 HxWx3: axes, numeric ticks, light grid, a legend at the right.

    `series` maps a name to (x, y) points (e.g. {"loss": [(step, loss), ...]}). Non-finite points
    (NaN, inf, and with `log_y` anything <= 0) break the line instead of being drawn; a point with
    no drawable neighbour gets a dot. Empty series still get a legend entry marked "(no data)".
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (int(width), int(height)), _WHITE)
    draw = ImageDraw.Draw(img)
    f_tick, f_label, f_title = _font(11), _font(12), _font(14)

    # Clean the data: keep order, mark unusable points as None so lines break there.
    cleaned: dict[str, list[tuple[float, float] | None]] = {}
    for name, pts in series.items():
        row: list[tuple[float, float] | None] = []
        for x, y in _finite_points(pts):
            ok = math.isfinite(x) and math.isfinite(y) and (not log_y or y > 0)
            row.append((x, y) if ok else None)
        cleaned[str(name)] = row
    xs = [p[0] for row in cleaned.values() for p in row if p is not None]
    ys = [p[1] for row in cleaned.values() for p in row if p is not None]
    has_data = bool(xs)

    # Ranges and ticks.
    x_lo, x_hi, x_ticks = _linear_ticks(min(xs) if xs else 0.0, max(xs) if xs else 1.0, target=6)
    if log_y and ys:
        y_lo, y_hi, y_ticks = _log_ticks(min(ys), max(ys))
        y_tick_pos = [math.log10(t) for t in y_ticks]
        y_labels = [_fmt_tick(t) for t in y_ticks]
    else:
        y_lo, y_hi, y_ticks = _linear_ticks(min(ys) if ys else 0.0, max(ys) if ys else 1.0, target=5)
        y_tick_pos = y_ticks
        ystep = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else None
        y_labels = [_fmt_tick(t, ystep) for t in y_ticks]
    xstep = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else None
    x_labels = [_fmt_tick(t, xstep) for t in x_ticks]

    # Layout: title on top, y label (rotated) + tick labels left, x tick labels + label below,
    # legend in its own column at the right so it never covers the lines.
    names = list(cleaned)
    legend_text = [n if any(p is not None for p in cleaned[n]) else f"{n} (no data)" for n in names]
    swatch = 18
    legend_w = (max((_text_size(draw, t, f_label)[0] for t in legend_text), default=0) + swatch + 16) if names else 0
    legend_w = min(legend_w, int(width * 0.35))
    title_h = _text_size(draw, title or "Ag", f_title)[1] if title else 0
    label_h = _text_size(draw, "Ag", f_label)[1]
    tick_h = _text_size(draw, "0", f_tick)[1]
    ytick_w = max((_text_size(draw, s, f_tick)[0] for s in y_labels), default=0)

    left = 8 + (label_h + 8 if ylabel else 0) + ytick_w + 8
    right = width - 10 - legend_w
    top = 10 + (title_h + 12 if title else 4)
    bottom = height - 8 - (label_h + 8 if xlabel else 0) - tick_h - 10
    right = max(right, left + 10)
    bottom = max(bottom, top + 10)

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        v = math.log10(y) if log_y else y
        return bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)

    def py_pos(pos: float) -> float:
        return bottom - (pos - y_lo) / (y_hi - y_lo) * (bottom - top)

    # Grid + ticks.
    for t, lab in zip(x_ticks, x_labels):
        x = px(t)
        draw.line([(x, top), (x, bottom)], fill=_GRID)
        draw.line([(x, bottom), (x, bottom + 4)], fill=_BLACK)
        _draw_text(draw, (x, bottom + 6), lab, f_tick, _GREY, anchor="mt")
    for pos, lab in zip(y_tick_pos, y_labels):
        y = py_pos(pos)
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.line([(left - 4, y), (left, y)], fill=_BLACK)
        _draw_text(draw, (left - 6, y), lab, f_tick, _GREY, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=_BLACK)

    # Lines (clipped to the plot box by construction: ranges cover all data).
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        row = cleaned[name]
        runs: list[list[tuple[float, float]]] = [[]]
        for p in row:
            if p is None:
                if runs[-1]:
                    runs.append([])
            else:
                runs[-1].append((px(p[0]), py(p[1])))
        for run in runs:
            if len(run) >= 2:
                draw.line(run, fill=colour, width=2, joint="curve")
            elif len(run) == 1:
                x, y = run[0]
                draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)

    if not has_data:
        _draw_text(draw, ((left + right) / 2, (top + bottom) / 2), "no data", f_label, _GREY, anchor="mm")

    # Title and axis labels.
    if title:
        _draw_text(draw, ((left + right) / 2, 10), title, f_title, anchor="ma")
    if xlabel:
        _draw_text(draw, ((left + right) / 2, height - 8), xlabel, f_label, anchor="md")
    if ylabel:
        tw, th = _text_size(draw, ylabel, f_label)
        tmp = Image.new("RGB", (tw + 4, th + 6), _WHITE)
        ImageDraw.Draw(tmp).text((2, 1), ylabel, fill=_BLACK, font=f_label)
        rot = tmp.rotate(90, expand=True)
        img.paste(rot, (8, int((top + bottom) / 2 - rot.height / 2)))

    # Legend: one row per series, colour swatch then name, in the right-hand column.
    if names:
        lx = right + 12
        ly = top + 2
        row_h = max(label_h, 8) + 6
        for i, text in enumerate(legend_text):
            if ly + row_h > height:
                break
            colour = PALETTE[i % len(PALETTE)]
            cy = ly + row_h / 2
            draw.line([(lx, cy), (lx + swatch - 4, cy)], fill=colour, width=3)
            avail = width - (lx + swatch) - 4
            _draw_text(draw, (lx + swatch, cy), _truncate(draw, text, f_label, avail), f_label, anchor="lm")
            ly += row_h

    return np.asarray(img, dtype=np.uint8)


def _truncate(draw, text: str, font, max_w: float) -> str:
    """`text`, shortened with an ellipsis until it fits `max_w` pixels."""
    if _text_size(draw, text, font)[0] <= max_w:
        return text
    for n in range(len(text) - 1, 0, -1):
        cand = text[:n].rstrip() + "…"
        if _text_size(draw, cand, font)[0] <= max_w:
            return cand
    return ""


def _as_nhwc_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 NxHxWx3 from NxHxW / NxHxWx1 / NxHxWx3 arrays (non-uint8 is clipped to 0..255)."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ValueError(f"expected N x H x W [x C] images, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a


def side_by_side(inputs: np.ndarray, recons: np.ndarray, n: int = 16, scale: int = 2) -> np.ndarray:
    """Inputs above their reconstructions: the first `n` pairs, up to 8 per row, as uint8.

    Layout (before `scale`): blocks of up to 8 pairs, each block an `image_grid` with pad 2 of two
    rows (inputs, then reconstructions, column i under column i), blocks stacked with a 6-px white
    gap. Block: 2*(h+2)+2 high, cols*(w+2)+2 wide, cols = min(n, 8); missing slots stay white.
    """
    a, b = _as_nhwc_uint8(inputs), _as_nhwc_uint8(recons)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"inputs {a.shape} and reconstructions {b.shape} differ in image shape")
    n = min(int(n), len(a), len(b))
    if n <= 0:
        raise ValueError("side_by_side needs at least one pair")
    ncols = min(n, 8)
    _, h, w, c = a.shape
    blocks = []
    for start in range(0, n, ncols):
        k = min(ncols, n - start)
        tiles = np.full((2 * ncols, h, w, c), 255, dtype=np.uint8)
        tiles[:k] = a[start:start + k]
        tiles[ncols:ncols + k] = b[start:start + k]
        blocks.append(image_grid(tiles, ncols=ncols, pad=2))
    gap = np.full((6, blocks[0].shape[1], c), 255, dtype=np.uint8)
    parts = []
    for i, blk in enumerate(blocks):
        if i:
            parts.append(gap)
        parts.append(blk)
    grid = np.concatenate(parts, axis=0)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def _wrap(draw, text: str, font, max_w: float, max_lines: int) -> list[str]:
    """Word-wrap `text` into at most `max_lines` lines of `max_w` pixels; the last is truncated."""
    words, lines = text.split(), []
    while words and len(lines) < max_lines:
        if len(lines) == max_lines - 1:  # last line: whatever is left, shortened to fit
            lines.append(_truncate(draw, " ".join(words), font, max_w))
            break
        line = words.pop(0)
        while words and _text_size(draw, f"{line} {words[0]}", font)[0] <= max_w:
            line = f"{line} {words.pop(0)}"
        lines.append(_truncate(draw, line, font, max_w))  # a single over-long word
    return lines


def captioned_grid(
    images: np.ndarray, captions: list[str], ncols: int = 8, scale: int = 2, max_lines: int = 2
) -> np.ndarray:
    """Images (scaled by `scale`) in a grid, each with a caption under it: word-wrapped to the tile
    width over at most `max_lines` lines, the last shortened with an ellipsis. Missing captions are
    blank. Returns uint8 HxWx3."""
    from PIL import Image, ImageDraw

    a = _as_nhwc_uint8(images)
    n, h, w, _ = a.shape
    if n == 0:
        raise ValueError("captioned_grid needs at least one image")
    scale = max(1, int(scale))
    max_lines = max(1, int(max_lines))
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    tw, th = w * scale, h * scale
    font = _font(10)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag", font)[1] + 3
    cap_h = max_lines * line_h + 4
    pad = 4
    cell_w, cell_h = tw + pad, th + cap_h + pad
    canvas = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), _WHITE)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, col = divmod(i, ncols)
        x, y = pad + col * cell_w, pad + r * cell_h
        tile = a[i].repeat(scale, axis=0).repeat(scale, axis=1)
        canvas.paste(Image.fromarray(tile), (x, y))
        text = str(captions[i]) if i < len(captions) and captions[i] is not None else ""
        for j, line in enumerate(_wrap(draw, text, font, tw, max_lines)):
            _draw_text(draw, (x + tw / 2, y + th + 3 + j * line_h), line, font, anchor="ma")
    return np.asarray(canvas, dtype=np.uint8)


def _fmt_cell(v, floatfmt: str) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return format(float(v), floatfmt)
    if isinstance(v, np.integer):
        v = int(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".3g") -> str:
    """A GitHub-flavoured markdown table. Columns default to the keys in first-seen order; floats
    use `floatfmt`, missing cells are blank, '|' is escaped. Numeric columns are right-aligned."""
    if columns is None:
        columns = []
        for row in rows:
            for k in row:
                if k not in columns:
                    columns.append(k)
    if not columns:
        return ""
    body = [[_fmt_cell(row.get(c), floatfmt) for c in columns] for row in rows]

    def numeric(c: str) -> bool:
        vals = [row.get(c) for row in rows if row.get(c) is not None]
        return bool(vals) and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in vals)

    header = "| " + " | ".join(str(c).replace("|", "\\|") for c in columns) + " |"
    sep = "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"
    lines = [header, sep] + ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def versions() -> dict:
    """Versions of python and the main libraries; None for a package that is not installed."""
    import platform
    from importlib import metadata

    out: dict = {"python": platform.python_version()}
    for pkg in ("torch", "ray", "diffusers", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
        except Exception:  # a broken install: report it rather than fail the report
            out[pkg] = None
    return out


def config_block(cfg_dict: dict) -> str:
    """The config as a fenced YAML block, keys in their given order."""
    import yaml

    text = yaml.safe_dump(_plain(cfg_dict), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"```yaml\n{text.rstrip()}\n```\n"


def _plain(obj):
    """Something yaml.safe_dump accepts: numpy scalars/arrays, tuples, paths made plain."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _safe_name(name: str) -> str:
    import re

    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s or "image"


def write_report(out_uri: str, *, title: str, sections: list[dict]) -> str:
    """Write `<out_uri>/report.md` and one `<out_uri>/<name>.png` per image; returns the report URI.

    Each section: {"heading": str, "text": markdown (optional), "table": list[dict] (optional),
    "images": [(name, uint8 image, caption), ...] (optional)}. Images are linked relatively
    (`![caption](name.png)`) so the folder can be moved or synced as a whole. Names are made
    filesystem-safe and de-duplicated.
    """
    from pipeline import storage

    lines = [f"# {title}", ""]
    used: set[str] = set()
    for sec in sections:
        lines += [f"## {sec.get('heading', '')}", ""]
        text = sec.get("text")
        if text:
            lines += [str(text).rstrip(), ""]
        table = sec.get("table")
        if table:
            lines += [markdown_table(table).rstrip(), ""]
        for item in sec.get("images") or []:
            name, image = item[0], item[1]
            caption = item[2] if len(item) > 2 and item[2] is not None else str(name)
            base = _safe_name(name[:-4] if str(name).lower().endswith(".png") else name)
            fname, k = f"{base}.png", 1
            while fname in used:
                k += 1
                fname = f"{base}_{k}.png"
            used.add(fname)
            storage.write_bytes(storage.join(out_uri, fname), png_bytes(image))
            cap = " ".join(str(caption).split()).replace("[", "(").replace("]", ")")
            lines += [f"![{cap}]({fname})", ""]
            if caption and str(caption) != str(name):
                lines += [f"*{cap}*", ""]
    uri = storage.join(out_uri, "report.md")
    storage.write_bytes(uri, ("\n".join(lines).rstrip() + "\n").encode("utf-8"))
    return uri
