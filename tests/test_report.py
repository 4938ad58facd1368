"""Report helpers: charts, grids, tables and the markdown report (no Ray, local folders only)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.eval.report.render import (
    PALETTE,
    captioned_grid,
    config_block,
    drawable,
    image_grid,
    line_chart,
    markdown_table,
    png_bytes,
    side_by_side,
    spread_pick,
    versions,
    write_report,
)


def _has_colour(img: np.ndarray, rgb, tol: int = 0) -> bool:
    return bool((np.abs(img.astype(int) - np.array(rgb)).max(axis=-1) <= tol).any())


def _curve(n=50, a=1.0):
    return [(float(i * 10), a * math.exp(-i / 10) + 0.05) for i in range(n)]


def test_line_chart_size_and_not_blank():
    img = line_chart({"loss": _curve()}, title="Loss", xlabel="step", ylabel="loss", width=500, height=300)
    assert img.dtype == np.uint8 and img.shape == (300, 500, 3)
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 5  # background, axes, text, grid, line...
    assert _has_colour(img, PALETTE[0])


def test_line_chart_default_size():
    img = line_chart({"loss": _curve()}, title="t", xlabel="x", ylabel="y")
    assert img.shape == (360, 640, 3)


def test_line_chart_two_series_two_colours():
    img = line_chart({"a": _curve(), "b": _curve(a=2.0)}, title="t", xlabel="x", ylabel="y")
    assert _has_colour(img, PALETTE[0]) and _has_colour(img, PALETTE[1])


def test_line_chart_log_y():
    pts = [(float(i), 10.0 ** (-i / 10)) for i in range(40)]
    img = line_chart({"kl": pts}, title="log", xlabel="step", ylabel="kl", log_y=True)
    assert img.shape == (360, 640, 3) and _has_colour(img, PALETTE[0])
    # Non-positive values are skipped rather than crashing the log axis.
    img = line_chart({"kl": pts + [(41.0, 0.0), (42.0, -1.0)]}, title="log", xlabel="s", ylabel="kl", log_y=True)
    assert _has_colour(img, PALETTE[0])


def test_line_chart_empty_nan_and_degenerate_series():
    img = line_chart({"psnr": []}, title="empty", xlabel="x", ylabel="y")
    assert img.shape == (360, 640, 3)
    img = line_chart({}, title="nothing", xlabel="x", ylabel="y", log_y=True)
    assert img.shape == (360, 640, 3)
    nan = float("nan")
    img = line_chart(
        {"rec": [(0, 1.0), (1, nan), (2, 0.5), (3, float("inf"))], "kl": [(0, nan)], "one": [(5, 2.0)],
         "flat": [(0, 3.0), (1, 3.0)], "psnr": []},
        title="mixed", xlabel="x", ylabel="y", width=320, height=200,
    )
    assert img.shape == (200, 320, 3)
    assert _has_colour(img, PALETTE[0])  # rec drawn around the NaN
    assert _has_colour(img, PALETTE[2])  # the single point gets a dot


def test_side_by_side_shape_and_pixels():
    rng = np.random.default_rng(0)
    h, w = 6, 5
    inputs = rng.integers(0, 255, size=(10, h, w, 3), dtype=np.uint8)
    recons = rng.integers(0, 255, size=(10, h, w, 3), dtype=np.uint8)
    pad, gap = 2, 6
    # 10 pairs -> two blocks of 8 columns (the second part-filled); each block two rows.
    grid = side_by_side(inputs, recons, n=16, scale=1)
    block_h, block_w = 2 * (h + pad) + pad, 8 * (w + pad) + pad
    assert grid.shape == (2 * block_h + gap, block_w, 3)
    for i in range(10):
        blk, col = divmod(i, 8)
        y0, x0 = blk * (block_h + gap) + pad, pad + col * (w + pad)
        np.testing.assert_array_equal(grid[y0:y0 + h, x0:x0 + w], inputs[i])
        y1 = y0 + h + pad  # the reconstruction sits right under its input
        np.testing.assert_array_equal(grid[y1:y1 + h, x0:x0 + w], recons[i])
    # Empty slots of the last block stay white.
    assert (grid[block_h + gap + pad:, pad + 2 * (w + pad):] == 255).all()

    # n limits the pairs; scale multiplies both sides.
    small = side_by_side(inputs, recons, n=4, scale=2)
    assert small.shape == (2 * (2 * (h + pad) + pad), 2 * (4 * (w + pad) + pad), 3)
    np.testing.assert_array_equal(small[2 * pad:2 * (pad + h):2, 2 * pad:2 * (pad + w):2], inputs[0])


def test_captioned_grid_shape():
    imgs = np.zeros((10, 8, 8, 3), dtype=np.uint8)
    caps = [f"a very long caption number {i} that cannot possibly fit under the tile" for i in range(10)]
    g1 = captioned_grid(imgs, caps, ncols=4, scale=2)
    g2 = captioned_grid(imgs[:4], caps[:4], ncols=4, scale=2)
    assert g1.dtype == np.uint8 and g1.ndim == 3 and g1.shape[2] == 3
    assert g1.shape[1] == g2.shape[1] >= 4 * 16  # same width: 4 columns of 16-px tiles
    assert g1.shape[0] > 3 * 16 and g1.shape[0] > g2.shape[0]  # 3 rows, each tile + caption
    # Fewer captions than images, and ncols larger than n, are fine.
    g3 = captioned_grid(imgs[:3], ["x"], ncols=8, scale=1)
    assert g3.shape[1] < g1.shape[1]
    # One caption line makes each row shorter than the default two.
    g4 = captioned_grid(imgs[:4], caps[:4], ncols=4, scale=2, max_lines=1)
    assert g4.shape[1] == g2.shape[1] and g4.shape[0] < g2.shape[0]


def test_captions_drawn_in_glyphs_the_font_has():
    assert drawable("flag: C\u00f4te d\u2019Ivoire") == "flag: Cote d'Ivoire"
    assert drawable("man \u2013 dancing") == "man - dancing"
    assert drawable("\u5b57 kanji") == "? kanji"
    # The grid draws the same pixels for a caption and its drawable form.
    imgs = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    a = captioned_grid(imgs, ["flag: C\u00f4te d\u2019Ivoire"], ncols=1, scale=4)
    b = captioned_grid(imgs, ["flag: Cote d'Ivoire"], ncols=1, scale=4)
    assert np.array_equal(a, b)


def test_markdown_table():
    md = markdown_table([{"name": "ema", "fid": 12.3456, "steps": 1000}, {"name": "raw|x", "fid": None}])
    lines = md.strip().splitlines()
    assert lines[0] == "| name | fid | steps |"
    assert re.fullmatch(r"\|(:?-{3,}:?\|){3}", lines[1])
    assert "12.3" in lines[2] and "12.34" not in lines[2] and "1000" in lines[2]
    assert "raw\\|x" in lines[3] and len(lines) == 4
    md2 = markdown_table([{"a": 1.0, "b": 2}], columns=["b", "a"], floatfmt=".2f")
    assert md2.splitlines()[0] == "| b | a |" and "1.00" in md2.splitlines()[2]


def test_versions_and_config_block():
    v = versions()
    assert set(v) >= {"python", "torch", "ray", "diffusers", "transformers"}
    assert v["python"] and v["torch"]
    block = config_block({"model": {"channels": 64, "lr": np.float32(1e-4)}, "name": "run"})
    assert block.startswith("```yaml\n") and block.rstrip().endswith("```")
    assert "channels: 64" in block and "name: run" in block


def test_write_report(tmp_path):
    chart = line_chart({"loss": _curve()}, title="Loss", xlabel="step", ylabel="loss", width=200, height=120)
    grid = image_grid(np.zeros((4, 4, 4, 3), dtype=np.uint8))
    out = str(tmp_path / "report")
    uri = write_report(
        out,
        title="Run 1",
        sections=[
            {"heading": "Training", "text": "Loss went down.", "images": [("loss_curve", chart, "Denoiser loss")]},
            {"heading": "Samples", "table": [{"fid": 10.5}], "images": [("grid", grid, "Samples [seed 0]")]},
            {"heading": "Empty"},
        ],
    )
    assert uri == str(tmp_path / "report" / "report.md")
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.startswith("# Run 1")
    assert "## Training" in text and "Loss went down." in text and "| fid |" in text
    for name, shape in (("loss_curve", chart.shape), ("grid", grid.shape)):
        assert re.search(rf"!\[[^\]]*\]\({name}\.png\)", text)
        with Image.open(tmp_path / "report" / f"{name}.png") as im:
            assert (im.height, im.width) == shape[:2]
    assert "![Denoiser loss](loss_curve.png)" in text


def test_png_bytes_roundtrip():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    import io

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(img)))), img)


@pytest.mark.parametrize("log_y", [False, True])
def test_line_chart_writes_example(tmp_path, log_y):
    img = line_chart({"loss": _curve(), "loss_q0": _curve(a=1.5)}, title="t", xlabel="step", ylabel="loss", log_y=log_y)
    Image.fromarray(img).save(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_spread_pick_prefers_distinct_prompts():
    prompts = [f"emoji {i // 4}" for i in range(256)]  # 64 prompts, 4 images each, grouped
    pick = spread_pick(prompts, 48)
    assert len(pick) == 48 and pick == sorted(pick)
    assert len({prompts[i] for i in pick}) == 48  # 48 different emoji, not 12 four times
    assert {prompts[i] for i in pick} >= {"emoji 0", "emoji 63"}  # spread over the whole run
    few = ["a"] * 10 + ["b"] * 10 + ["c"] * 10  # fewer distinct prompts than k: all of them, then the rest
    pick = spread_pick(few, 8)
    assert len(pick) == 8 == len(set(pick)) and {few[i] for i in pick} == {"a", "b", "c"}
    assert spread_pick(few, 100) == list(range(30)) and spread_pick([], 5) == []
