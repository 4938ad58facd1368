"""Ingest-side data code: decode, reject reasons, shard round trips, built-in sources.

Pure and fast (no Ray, no network): the emoji tests render a few dozen glyphs, Fashion-MNIST tests
read headers and a handful of samples.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import config, storage
from pipeline.data import decode, ingest, schema, shards, sources
from pipeline.data.sources import fashion_mnist, openmoji

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def solid_png(color=(200, 30, 30), size=(32, 32)) -> bytes:
    return png_bytes(Image.new("RGB", size, color))


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------


def test_rgba_is_composited_over_white():
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red: must become white
    img.paste((0, 0, 255, 255), (8, 8, 24, 24))  # opaque blue square in the middle
    arr = decode.decode_image(png_bytes(img), 32)
    assert arr.dtype == np.uint8 and arr.shape == (32, 32, 3)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[16, 16]) == (0, 0, 255)


def test_half_transparent_blends_with_white():
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 128))
    arr = decode.decode_image(png_bytes(img), 16)
    assert np.all(np.abs(arr.astype(int) - 127) <= 2)


def test_resize_short_side_then_center_crop():
    # 60x20: left third red, middle third green, right third blue -> centre crop keeps green
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 255, 0), (20, 0, 40, 20))
    img.paste((0, 0, 255), (40, 0, 60, 20))
    arr = decode.decode_image(png_bytes(img), 10)
    assert arr.shape == (10, 10, 3)
    assert np.all(arr[:, 2:8, 1] > 200) and np.all(arr[:, 2:8, 0] < 50)
    tall = decode.decode_image(png_bytes(Image.new("RGB", (20, 70), (9, 9, 9))), 48)  # upscaling too
    assert tall.shape == (48, 48, 3)


@pytest.mark.parametrize("mode", ["L", "1", "P", "LA", "I;16", "CMYK"])
def test_other_modes_become_rgb(mode):
    img = Image.new(mode, (20, 20))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    arr = decode.decode_image(png_bytes(img, fmt), 12)
    assert arr.shape == (12, 12, 3) and arr.dtype == np.uint8


def test_grey_to_rgb_keeps_value():
    arr = decode.decode_image(png_bytes(Image.new("L", (28, 28), 77)), 32)
    assert arr.shape == (32, 32, 3)
    assert np.all(arr == 77)


def test_palette_transparency_is_white():
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    arr = decode.decode_image(png_bytes(img), 8)
    assert np.all(arr == 255)


# ---------------------------------------------------------------------------------------------
# reject reasons
# ---------------------------------------------------------------------------------------------


def _code(result) -> str:
    arr, reason = result
    assert arr is None and isinstance(reason, str)
    assert schema.reason_code(reason) in schema.REASON_CODES
    return schema.reason_code(reason)


def test_good_record_passes():
    arr, reason = decode.check_record("k", solid_png(), "a red square", 16)
    assert reason is None and arr.shape == (16, 16, 3)


def test_reject_reasons():
    good = solid_png()
    assert _code(decode.check_record("k", b"not an image at all", "c", 16)) == "undecodable_image"
    assert _code(decode.check_record("k", good[: len(good) // 2], "c", 16)) == "undecodable_image"
    jpg = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    assert _code(decode.check_record("k", jpg[:200], "c", 16)) == "undecodable_image"
    assert _code(decode.check_record("k", None, "c", 16)) == "missing_image"
    assert _code(decode.check_record("k", b"", "c", 16)) == "missing_image"
    assert _code(decode.check_record("k", good, None, 16)) == "missing_caption"
    assert _code(decode.check_record("k", good, "", 16)) == "empty_caption"
    assert _code(decode.check_record("k", good, " \n\t ", 16)) == "empty_caption"
    assert _code(decode.check_record("k", good, b"\xff\xfe bad", 16)) == "caption_not_utf8"
    tiny = png_bytes(Image.new("RGB", (4, 40)))
    assert _code(decode.check_record("k", tiny, "c", 16)) == "image_too_small"
    assert _code(decode.check_record("k", good, "c", 16, max_pixels=100)) == "image_too_large"


def test_reasons_are_stable_and_short():
    _, r1 = decode.check_record("a", b"garbage-1", "c", 8)
    _, r2 = decode.check_record("b", b"garbage-2", "c", 8)
    assert r1 == r2  # no memory addresses or other per-call noise
    assert "\n" not in r1 and len(r1) < 250


def test_bytes_caption_accepted():
    arr, reason = decode.check_record("k", solid_png(), "über".encode("utf-8"), 8)
    assert reason is None and arr is not None


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------


def _records(n: int):
    colors = [(i * 40 % 256, 100, 255 - i * 40 % 256) for i in range(n)]
    return [(f"{i:06d}", solid_png(c), f"caption number {i}", {"index": i}) for i, c in enumerate(colors)]


def test_webdataset_round_trip(tmp_path):
    recs = _records(7)
    out = str(tmp_path / "raw")
    result = shards.write_webdataset_shards(recs, out, shard_size=3)
    assert result["num_shards"] == 3 and result["num_records"] == 7 and result["counts"] == [3, 3, 1]
    listed = shards.list_shards(out, "webdataset")
    assert [os.path.basename(u) for u in listed] == ["00000.tar", "00001.tar", "00002.tar"]
    assert listed == result["shards"]
    stats = storage.read_json(storage.join(out, "00000_stats.json"))
    assert stats["count"] == 3 and stats["successes"] == 3
    got = [r for u in listed for r in shards.read_shard(u, "webdataset")]
    assert [r["key"] for r in got] == [k for k, *_ in recs]
    assert [r["caption"] for r in got] == [c for _, _, c, _ in recs]
    assert all(r["reason"] is None and r["ext"] == "png" and r["source"] in listed for r in got)
    assert got[0]["image"] == recs[0][1]
    assert got[4]["meta"]["index"] == 4 and got[4]["meta"]["width"] == 32
    for r in got:
        arr, reason = decode.check_record(r["key"], r["image"], r["caption"], 8)
        assert reason is None and arr.shape == (8, 8, 3)
    # members follow img2dataset's naming
    with tarfile.open(listed[0]) as tf:
        assert tf.getnames()[:3] == ["000000.png", "000000.txt", "000000.json"]


def test_shards_are_deterministic(tmp_path):
    a = shards.write_webdataset_shards(_records(3), str(tmp_path / "a"), 10)
    b = shards.write_webdataset_shards(_records(3), str(tmp_path / "b"), 10)
    assert storage.read_bytes(a["shards"][0]) == storage.read_bytes(b["shards"][0])


def test_writer_rejects_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        shards.write_webdataset_shards(_records(2) + _records(1), str(tmp_path / "d"), 10)
    with pytest.raises(ValueError, match="bad sample key"):
        shards.write_webdataset_shards([("a.b", solid_png(), "c", {})], str(tmp_path / "e"), 10)


def test_corrupt_member_becomes_reject_others_survive(tmp_path):
    recs = _records(4)
    recs[1] = (recs[1][0], b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, recs[1][2], {})
    out = str(tmp_path / "raw")
    shards.write_webdataset_shards(recs, out, shard_size=10)
    (uri,) = shards.list_shards(out, "webdataset")
    got = shards.read_shard(uri)
    assert [r["key"] for r in got] == [k for k, *_ in recs]
    results = {r["key"]: decode.check_record(r["key"], r["image"], r["caption"], 8) for r in got}
    bad = {k: reason for k, (arr, reason) in results.items() if reason is not None}
    assert list(bad) == ["000001"]
    assert bad["000001"].startswith("undecodable_image")


def _raw_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_reader_tolerates_missing_members_and_bad_captions():
    good = solid_png()
    data = _raw_tar(
        [
            ("a.png", good), ("a.txt", b"fine"),
            ("b.png", good),  # no caption
            ("c.txt", b"no image"), ("c.json", b"{not json"),
            ("d.jpg", good), ("d.txt", b"\xff\xfe"),  # caption not UTF-8
            ("README", b"ignored"), (".hidden.txt", b"ignored"),
        ]
    )
    got = {r["key"]: r for r in shards.read_webdataset_shard(data, "mem://s.tar")}
    assert set(got) == {"a", "b", "c", "d"}
    assert got["a"]["reason"] is None and got["a"]["caption"] == "fine"
    assert got["b"]["caption"] is None and got["b"]["reason"] is None
    assert got["c"]["image"] is None and got["c"]["meta"] is None
    assert schema.reason_code(got["d"]["reason"]) == "caption_not_utf8"
    reasons = {k: r["reason"] or decode.check_record(k, r["image"], r["caption"], 8)[1] for k, r in got.items()}
    assert reasons["a"] is None
    assert reasons["b"] == "missing_caption" and reasons["c"] == "missing_image"


def test_corrupt_tar_yields_one_marker():
    for junk in (b"this is not a tar file" * 50, b""):
        got = shards.read_webdataset_shard(junk, "s3://b/raw/00003.tar")
        assert len(got) == 1
        assert got[0]["key"] == "s3://b/raw/00003.tar" and got[0]["source"] == "s3://b/raw/00003.tar"
        assert schema.reason_code(got[0]["reason"]) == "corrupt_shard"


def test_truncated_tar_keeps_head_and_marks_tail():
    png = solid_png()
    assert len(png) < 512  # layout below: each member is one 512-byte header + one data block
    data = _raw_tar([(f"{i}.png", png) for i in range(3)] + [(f"{i}.txt", b"c") for i in range(3)])
    content_end = 6 * 1024
    for cut in (content_end - 1024, content_end, 1200, 2048 + 512 + 50):
        got = shards.read_webdataset_shard(data[:cut], "x.tar")
        assert got[-1]["key"] == "x.tar" and schema.reason_code(got[-1]["reason"]) == "corrupt_shard"
        assert got[0]["key"] == "0"
    # cut inside the data of 2.png: that member is unreadable, the earlier ones are intact
    got = {r["key"]: r for r in shards.read_webdataset_shard(data[: 2048 + 512 + 50], "x.tar")}
    assert schema.reason_code(got["2"]["reason"]) == "unreadable_member"
    assert got["1"]["reason"] is None and got["1"]["image"] == png
    # cut after the end-of-archive blocks: complete, no marker
    assert [r["key"] for r in shards.read_webdataset_shard(data[: content_end + 1024], "x.tar")] == ["0", "1", "2"]
    # a damaged header in the middle: tarfile would stop silently; we must notice
    damaged = bytearray(data)
    second_header = 1024
    damaged[second_header : second_header + 100] = b"\x07" * 100
    got = shards.read_webdataset_shard(bytes(damaged), "y.tar")
    assert got[0]["key"] == "0" and got[-1]["key"] == "y.tar"
    assert schema.reason_code(got[-1]["reason"]) == "corrupt_shard"


def test_parquet_round_trip(tmp_path):
    recs = _records(5)
    recs.append({"key": "nocap", "image": solid_png(), "caption": None})
    out = str(tmp_path / "pq")
    result = shards.write_parquet_shards(recs, out, shard_size=4)
    assert result["num_shards"] == 2 and result["num_records"] == 6
    listed = shards.list_shards(out, "parquet")
    assert [os.path.basename(u) for u in listed] == ["00000.parquet", "00001.parquet"]
    got = [r for u in listed for r in shards.read_shard(u, "parquet")]
    assert [r["key"] for r in got] == [f"{i:06d}" for i in range(5)] + ["nocap"]
    assert got[2]["caption"] == "caption number 2" and got[2]["image"] == recs[2][1]
    assert decode.check_record("nocap", got[-1]["image"], got[-1]["caption"], 8)[1] == "missing_caption"
    bad = shards.read_parquet_shard(b"PAR1 nope", "z.parquet")
    assert len(bad) == 1 and schema.reason_code(bad[0]["reason"]) == "corrupt_shard"


def test_list_shards_skips_other_files(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00001.tar.tmp-abcd").write_bytes(b"")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert shards.list_shards(str(tmp_path), "webdataset") == [str(tmp_path / "00000.tar")]
    assert shards.list_shards(str(tmp_path / "missing"), "webdataset") == []
    with pytest.raises(ValueError):
        shards.list_shards(str(tmp_path), "zip")


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


def test_emoji_counts_and_split_are_disjoint():
    n_train = sources.count_source("emoji", "train")
    n_test = sources.count_source("emoji", "test")
    assert n_train > 1000 and 100 < n_test < n_train
    assert 1500 < n_train + n_test < 2500  # ~1,900 without skin tones
    assert openmoji.count_emoji("train", include_skin_tones=True) > 3000


def test_emoji_samples_render():
    items = list(sources.iter_source("emoji", "train", limit=25))
    assert len(items) == 25
    keys = [k for k, *_ in items]
    assert len(set(keys)) == 25 and all("." not in k and "/" not in k for k in keys)
    for key, data, caption, meta in items:
        assert caption and caption == caption.strip() and "_" not in caption and ":" not in caption
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGBA"
        alpha = np.asarray(img)[..., 3]
        assert (alpha > 0).mean() > 0.02  # not blank
        rgb = decode.decode_image(data, 32)
        assert rgb.std() > 5  # more than a flat colour
        assert meta["license"] == "CC BY-SA 4.0" and meta["name"] == caption
    # deterministic
    assert [k for k, *_ in sources.iter_source("emoji", "train", limit=5)] == keys[:5]


def test_emoji_known_names():
    assert openmoji.emoji_caption_name("\U0001F600", ":grinning_face:") == "grinning face"
    assert openmoji.emoji_caption_name("\U0001F1FA\U0001F1F8", ":United_States:") == "flag of United States"
    assert openmoji.emoji_key("\U0001F600") == "emoji_1f600"
    names = {name for _, name in openmoji._emoji_catalogue(openmoji.emoji_font_path(), False)}
    assert {"grinning face", "red heart", "cat face", "pizza"} <= names
    assert not any("skin tone" in n for n in names)
    # render one known emoji: a yellow face
    img = openmoji.render_emoji("\U0001F600", size=32)
    rgb = np.asarray(img)[..., :3][np.asarray(img)[..., 3] > 200]
    assert rgb[:, 0].mean() > 150 and rgb[:, 1].mean() > 120  # yellowish


def test_emoji_templates_and_size():
    (key, data, caption, meta), = sources.iter_source("emoji", "test", limit=1, size=32, caption_templates=True)
    assert Image.open(io.BytesIO(data)).size == (32, 32)
    assert meta["name"] in caption and meta["split"] == "test"


def test_emoji_renders_of_chosen_emoji():
    names = ["fire", "cat face", "pizza"]
    train = list(sources.iter_source("emoji", "train", size=32, names=names, renders=12))
    test = list(sources.iter_source("emoji", "test", size=32, names=names, renders=12))
    assert len(train) + len(test) == 36 and len(test) >= 1
    assert len(train) == sources.count_source("emoji", "train", names=names, renders=12)
    assert len(test) == sources.count_source("emoji", "test", names=names, renders=12)
    keys = [k for k, *_ in train + test]
    assert len(set(keys)) == 36 and all(k.rsplit("_r", 1)[1].isdigit() for k in keys)
    assert {m["name"] for *_, m in train} == set(names)  # every chosen emoji, none other
    assert all(caption == m["name"] for _, _, caption, m in train + test)
    by_render = {(m["name"], m["render"]): np.asarray(Image.open(io.BytesIO(d))) for _, d, _, m in train + test}
    fire = [by_render[("fire", r)] for r in range(12)]
    # render 0 is the plain glyph; the others are moved, so no two renders share their pixels
    assert np.array_equal(fire[0], np.asarray(openmoji.render_emoji("\U0001F525", size=32)))
    diffs = [np.abs(a.astype(int) - b.astype(int)).mean() for i, a in enumerate(fire) for b in fire[i + 1:]]
    assert min(diffs) > 1.0
    # ...but each stays the same emoji: nearer its own plain glyph than the other emoji's
    plain = {n: by_render[(n, 0)].astype(int) for n in names}
    for name in names:
        for r in range(1, 12):
            img = by_render[(name, r)].astype(int)
            assert min(plain, key=lambda n: np.abs(img - plain[n]).mean()) == name, (name, r)
    # deterministic
    again = list(sources.iter_source("emoji", "train", size=32, names=names, renders=12))
    assert [d for _, d, *_ in again] == [d for _, d, *_ in train]


def test_unknown_emoji_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'firee'.*did you mean 'fire'"):
        sources.count_source("emoji", "train", names=["firee"], renders=3)
    cfg = config.load(os.path.join(ROOT, "configs", "tiny.yaml"),
                      [f"run.storage={tmp_path}", "data.emoji_names=[fire, catface]", "data.emoji_renders=3"])
    with pytest.raises(config.ConfigError, match="data.emoji_names: .*'catface'.*'cat face'"):
        ingest.ingest(cfg)
    one = config.load(os.path.join(ROOT, "configs", "tiny.yaml"), [f"run.storage={tmp_path}", "data.emoji_names=[fire]"])
    with pytest.raises(config.ConfigError, match="data.emoji_names / data.emoji_renders: .*split empty"):
        ingest.ingest(one)  # one emoji drawn once is in train or in test, never both
    assert not os.path.exists(tmp_path / "datasets")  # nothing written


def test_fashion_mnist_counts_and_first_sample():
    if not os.path.exists(os.path.join(fashion_mnist.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")):
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    assert sources.count_source("fashion_mnist", "train") == 60000
    assert sources.count_source("fashion_mnist", "test") == 10000
    first = list(sources.iter_source("fashion_mnist", "train", limit=3))
    assert len(first) == 3
    key, data, caption, meta = first[0]
    assert key == "fmnist_train_00000"
    assert meta["label"] == 9 and meta["class_name"] == "Ankle boot"
    assert caption == "a photo of an ankle boot"
    assert first[1][3]["label"] == 0 and first[1][2] == "a t-shirt/top"
    img = Image.open(io.BytesIO(data))
    assert img.size == (28, 28) and img.mode == "L"
    assert decode.decode_image(data, 32).shape == (32, 32, 3)
    (_, _, _, test_meta), = sources.iter_source("fashion_mnist", "test", limit=1)
    assert test_meta["label"] == 9


def test_fashion_mnist_missing_files_names_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        sources.iter_source("fashion_mnist", "train", root=str(tmp_path))


def test_unknown_source_and_split():
    with pytest.raises(ValueError, match="emoji.*fashion_mnist"):
        sources.iter_source("cifar", "train")
    with pytest.raises(ValueError, match="train"):
        sources.iter_source("emoji", "validation")


def test_source_to_shards_to_decode(tmp_path):
    out = str(tmp_path / "emoji")
    result = shards.write_webdataset_shards(sources.iter_source("emoji", "train", limit=6), out, shard_size=4)
    assert result["num_records"] == 6
    recs = [r for u in shards.list_shards(out) for r in shards.read_shard(u)]
    assert len(recs) == 6 and all(r["meta"]["dataset"] == "emoji" for r in recs)
    for r in recs:
        arr, reason = decode.check_record(r["key"], r["image"], r["caption"], 16)
        assert reason is None and arr[0, 0].tolist() == [255, 255, 255]  # transparent corner -> white
    json.dumps(recs[0]["meta"])  # meta stays JSON-serialisable
