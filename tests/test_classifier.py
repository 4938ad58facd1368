"""Fashion-MNIST prompt-faithfulness classifier: prompt parsing, training, caching, scoring."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.data.sources.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_TEMPLATES,
    fashion_mnist_caption,
)
from pipeline.eval import classifier as clf

_FMNIST_ROOT = os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR)
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(_FMNIST_ROOT, "t10k-labels-idx1-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed",
)


@pytest.fixture
def one_thread():
    """Training on one thread: on a busy 2-core machine two OpenMP threads can be several times
    slower than one, and a fixed thread count keeps the run deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------- prompts

def test_class_names_follow_the_source():
    assert clf.CLASS_NAMES == tuple(c.lower() for c in FASHION_MNIST_CLASSES)


@pytest.mark.parametrize("label", range(10))
def test_label_from_every_template_caption(label):
    for index in range(2 * len(FASHION_MNIST_TEMPLATES) + 1):
        caption = fashion_mnist_caption(label, index)
        assert clf.label_from_prompt(caption) == label, caption
        assert clf.label_from_prompt(caption.upper()) == label
        assert clf.label_from_prompt(f"  {caption}.  ") == label


@pytest.mark.parametrize("prompt, label", [
    ("a shirt", 6), ("a t-shirt/top", 0), ("a T-Shirt", 0), ("a black and white image of a shirt", 6),
    ("two sneakers", 7), ("an ankle boot", 9), ("ankle  boots", 9), ("a boot", 9), ("sandals", 5),
    ("trousers", 1), ("a photo of a bag", 8), ("a coat", 4), ("a dress", 3), ("a pullover", 2),
    ("a t\u2011shirt", 0),
])
def test_label_from_prompt_variants(prompt, label):
    assert clf.label_from_prompt(prompt) == label


@pytest.mark.parametrize("prompt", [
    "", "a photo of a cat", "a black and white image", "an overcoat", "a laptop", "shirtless",
    "bagel", "sandalwood", "a bag and a coat",  # two different classes: not a class prompt
    "dressing", "a sneakerhead",
])
def test_label_from_prompt_none(prompt):
    assert clf.label_from_prompt(prompt) is None


def test_label_from_prompt_same_class_twice_is_fine():
    assert clf.label_from_prompt("a shirt, a photo of a shirt") == 6
    assert clf.label_from_prompt(None) is None  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- data + model

@pytest.fixture(scope="module")
def fmnist():
    train = clf.fashion_arrays("train", 3000)
    test = clf.fashion_arrays("test", 1000)
    return train, test


@needs_fmnist
def test_fashion_arrays(fmnist):
    (x, y, captions), _ = fmnist
    assert x.shape == (3000, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (3000,) and y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])  # grey as RGB
    assert [clf.label_from_prompt(c) for c in captions] == y.tolist()
    small = clf.fashion_arrays("test", 3, size=28)[0]
    assert small.shape == (3, 28, 28, 3)


def test_model_accepts_rgb_grey_and_other_sizes():
    model = clf.SmallCNN().eval()
    rgb = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        out_rgb = model(rgb)
        grey = np.round(rgb.astype(np.float64) @ np.array(clf.LUMA)).astype(np.uint8)
        assert out_rgb.shape == (4, 10)
        assert model(grey).shape == (4, 10)
        assert model(grey[..., None]).shape == (4, 10)
        assert model(torch.from_numpy(rgb)).shape == (4, 10)
        assert model(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 10)
        same = np.repeat(grey[..., None], 3, axis=-1)  # grey as RGB == grey
        torch.testing.assert_close(model(same), model(grey), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        model(np.zeros((2, 32, 32, 2), np.uint8))


@needs_fmnist
def test_quick_training_beats_chance(fmnist, one_thread):
    (x, y, _), (xt, yt, captions) = fmnist
    model = clf.train_classifier(x, y, epochs=2, batch_size=64, seed=0, lr=3e-3)
    result = clf.evaluate(model, xt, yt)
    assert result["n"] == 1000
    assert result["accuracy"] > 0.7, result
    assert set(result["per_class"]) == set(clf.CLASS_NAMES)
    counts = result["per_class_n"]
    weighted = sum(result["per_class"][c] * counts[c] for c in clf.CLASS_NAMES) / sum(counts.values())
    assert weighted == pytest.approx(result["accuracy"])
    # prompts from the source's own captions: prompt accuracy == label accuracy
    assert clf.prompt_accuracy(model, xt, captions)["accuracy"] == pytest.approx(result["accuracy"])


def test_training_is_deterministic_and_keeps_global_rng(one_thread):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    y = np.arange(48) % 10
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = clf.train_classifier(x, y, epochs=1, batch_size=16, seed=5, lr=1e-3, augment=True)
    assert torch.equal(torch.rand(1), expected_next)  # global RNG untouched
    b = clf.train_classifier(x, y, epochs=1, batch_size=16, seed=5, lr=1e-3, augment=True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(ValueError):
        clf.train_classifier(x, y[:-1], epochs=1, batch_size=16, seed=0, lr=1e-3)
    with pytest.raises(ValueError):
        clf.train_classifier(x, y + 5, epochs=1, batch_size=16, seed=0, lr=1e-3)


# ----------------------------------------------------------------------------------------- caching

def test_load_or_train_caches(tmp_path, one_thread):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    y = np.arange(40) % 10
    calls = {"data": 0, "test": 0}

    def data_fn():
        calls["data"] += 1
        return x, y

    def test_fn():
        calls["test"] += 1
        return x[:20], y[:20]

    uri = str(tmp_path / "cache" / "classifier.safetensors")
    identity = {"dataset": "synthetic", "n": 40}
    kw = dict(epochs=1, batch_size=16, lr=1e-3)
    m1, info1 = clf.load_or_train(uri, identity, data_fn, test_fn, **kw)
    assert not info1["cached"] and calls == {"data": 1, "test": 1}
    assert os.path.exists(uri) and info1["test"]["n"] == 20

    m2, info2 = clf.load_or_train(uri, identity, data_fn, test_fn, **kw)
    assert info2["cached"] and calls == {"data": 1, "test": 1}
    assert info2["test"] == info1["test"]
    assert np.array_equal(clf.predict(m1, x), clf.predict(m2, x))
    assert not m2.training

    _, info3 = clf.load_or_train(uri, {"dataset": "synthetic", "n": 41}, data_fn, **kw)  # identity changed
    assert not info3["cached"] and calls["data"] == 2 and info3["test"] is None
    _, info4 = clf.load_or_train(uri, {"dataset": "synthetic", "n": 41}, data_fn, **kw)
    assert info4["cached"] and calls["data"] == 2
    _, info5 = clf.load_or_train(uri, {"dataset": "synthetic", "n": 41}, data_fn, epochs=1, batch_size=8, lr=1e-3)
    assert not info5["cached"] and calls["data"] == 3  # training settings are part of the identity

    with open(uri, "wb") as f:
        f.write(b"not a safetensors file")
    _, info6 = clf.load_or_train(uri, identity, data_fn, **kw)
    assert not info6["cached"] and calls["data"] == 4

    # Weights changed at equal size: still a readable cache object, but its recorded hash refuses it.
    data = bytearray(open(uri, "rb").read())
    data[-32:] = bytes(b ^ 0x55 for b in data[-32:])
    with open(uri, "wb") as f:
        f.write(bytes(data))
    clf._decode_cache(bytes(data))  # parses: the fault would go unnoticed without the hash
    _, info7 = clf.load_or_train(uri, identity, data_fn, **kw)
    assert not info7["cached"] and calls["data"] == 5

    with pytest.raises(TypeError):
        clf.load_or_train(uri, identity, data_fn, epoch=1)


# ----------------------------------------------------------------------------------------- scoring

class _Oracle(nn.Module):
    """Predicts the class written in pixel (0, 0, 0)."""

    def forward(self, images):
        v = torch.as_tensor(np.asarray(images))[:, 0, 0, 0].long()
        return nn.functional.one_hot(v, 10).float()


def test_prompt_accuracy_arithmetic():
    # (prompt, predicted class)
    rows = [
        ("a shirt", 6), ("a photo of a shirt", 6), ("a shirt", 0),  # shirt: 2/3
        ("a t-shirt/top", 0), ("a t-shirt/top", 6),                  # t-shirt/top: 1/2
        ("an ankle boot", 9),                                        # ankle boot: 1/1
        ("a cat", 3), ("a bag and a coat", 8),                       # unlabelled: 2
    ]
    images = np.zeros((len(rows), 32, 32, 3), np.uint8)
    for i, (_, pred) in enumerate(rows):
        images[i, 0, 0, 0] = pred
    result = clf.prompt_accuracy(_Oracle(), images, [p for p, _ in rows])
    assert result["n"] == 6 and result["unlabelled"] == 2 and result["correct"] == 4
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["per_class"]["shirt"] == pytest.approx(2 / 3)
    assert result["per_class"]["t-shirt/top"] == pytest.approx(0.5)
    assert result["per_class"]["ankle boot"] == 1.0
    assert result["per_class"]["bag"] is None and result["per_class_n"]["bag"] == 0
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 6 and confusion[6, 0] == 1 and confusion[0, 6] == 1 and confusion[6, 6] == 2

    empty = clf.prompt_accuracy(_Oracle(), images[6:], ["a cat", "a dog"])
    assert empty["n"] == 0 and empty["unlabelled"] == 2 and np.isnan(empty["accuracy"])
    with pytest.raises(ValueError):
        clf.prompt_accuracy(_Oracle(), images, ["a shirt"])


def test_nearest_caption_accuracy_on_emoji_renders():
    """The retrieval check behind eval.nearest_match_images, on real renders: unseen renders of an
    emoji find a render of the same emoji; the same images under wrong prompts score 0."""
    from pipeline.data import decode, sources
    from pipeline.eval.scoring import NearestMatch

    def nearest_caption_accuracy(images, prompts, ref_images, ref_captions) -> dict:
        n, hits, chance = NearestMatch(ref_images, ref_captions).score(images, prompts)
        return {"n": n, "accuracy": hits / n if n else None, "chance": chance / n if n else None}

    names = ["fire", "cat face", "pizza", "rocket"]
    items = list(sources.iter_source("emoji", "train", size=64, names=names, renders=16)) + \
        list(sources.iter_source("emoji", "test", size=64, names=names, renders=16))
    images = np.stack([decode.decode_image(d, 32) for _, d, _, _ in items])
    captions = [c for _, _, c, _ in items]
    renders = np.array([m["render"] for *_, m in items])
    ref, query = renders < 12, renders >= 12  # held-out renders as the "generated" images
    ref_caps = [c for c, r in zip(captions, ref) if r]
    prompts = [c for c, q in zip(captions, query) if q]
    right = nearest_caption_accuracy(images[query], prompts, images[ref], ref_caps)
    assert right["n"] == 16 and right["accuracy"] == 1.0 and right["chance"] == pytest.approx(0.25)
    wrong = [names[(names.index(p) + 1) % 4] for p in prompts]
    assert nearest_caption_accuracy(images[query], wrong, images[ref], ref_caps)["accuracy"] == 0.0
    # prompts that are no reference caption are left out, not counted as misses
    mixed = nearest_caption_accuracy(images[query], prompts[:8] + ["a unicorn"] * 8, images[ref], ref_caps)
    assert mixed["n"] == 8 and mixed["accuracy"] == 1.0
    assert nearest_caption_accuracy(images[query], ["a unicorn"] * 16, images[ref], ref_caps)["accuracy"] is None
