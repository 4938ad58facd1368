"""Pictures and text for people: PNG encoding, sample grids, captioned grids, reconstructions
side by side (PIL), line charts (matplotlib), markdown tables and the report folder."""

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


# matplotlib's tab10: distinct, colour-blind tolerable, readable on white.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
_BLACK, _WHITE = (0, 0, 0), (255, 255, 255)


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
    """A line chart (matplotlib, Agg) as uint8 height x width x 3, the legend outside the axes.

    `series` maps a name to (x, y) points (e.g. {"loss": [(step, loss), ...]}). Non-finite points
    (NaN, inf, and with `log_y` anything <= 0) break the line instead of being drawn; a point with
    no drawable neighbour gets a dot. Empty series still get a legend entry marked "(no data)".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)  # Agg on the figure itself: no pyplot, no global backend, no display
    ax = fig.add_subplot()
    drawn = False
    for i, (name, points) in enumerate(series.items()):
        colour = tuple(c / 255 for c in PALETTE[i % len(PALETTE)])
        x, y = _points(points, log_y)
        ok = np.isfinite(y)
        lonely = ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]  # no finite neighbour: a dot
        label = drawable(str(name)) + ("" if ok.any() else " (no data)")
        ax.plot(x, y, color=colour, linewidth=2, label=label)
        if lonely.any():
            ax.plot(x[lonely], y[lonely], "o", color=colour, markersize=5)
        drawn |= bool(ok.any())
    if log_y and drawn:
        ax.set_yscale("log")
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.35")
    ax.set_title(drawable(title), fontsize=11)
    ax.set_xlabel(drawable(xlabel), fontsize=9)
    ax.set_ylabel(drawable(ylabel), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="0.9", linewidth=0.8)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout(pad=0.6)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba(), dtype=np.uint8)[..., :3].copy()


def _points(points, log_y: bool) -> tuple[np.ndarray, np.ndarray]:
    """x and y as float arrays, unusable y (and unparsable points) as NaN so the line breaks there."""
    xs, ys = [], []
    for p in points or []:
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            continue
        if not (math.isfinite(x) and math.isfinite(y)) or (log_y and y <= 0):
            y = math.nan
        xs.append(x if math.isfinite(x) else math.nan)
        ys.append(y)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


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
