"""The ``fashion_mnist`` dataset: the Debian package ``dataset-fashion-mnist`` (MIT), 60,000 + 10,000
28x28 grey images of 10 classes read from its IDX files, captioned from the class name through a few
templates.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.data.sources.base import Sample, check_split, png_bytes


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FASHION_MNIST_DIR"  # overrides the default folder (local path or URI)
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# {a} is "a" or "an" to suit the lower-cased class name {c} ("an ankle boot", "a t-shirt/top").
FASHION_MNIST_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {c}",
    "{a} {c}",
    "a black and white image of {a} {c}",
)
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def _fashion_files(split: str, root: str | None) -> tuple[str, str]:
    check_split(split)
    root = root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
    prefix = _IDX_PREFIX[split]
    images = storage.join(root, f"{prefix}-images-idx3-ubyte.gz")
    labels = storage.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    missing = [p for p in (images, labels) if not storage.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install the Debian package "
            f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or point root= / "
            f"${FASHION_MNIST_ENV} at a folder holding {prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz."
        )
    return images, labels


def _read_exact(f: Any, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{what}: file ends early (wanted {n} bytes, got {len(data)})")
    return data


def _idx_header(f: Any, expected_magic: int, ndims: int, what: str) -> tuple[int, ...]:
    """(count, *dims) from an IDX header; big-endian int32s (magic, count, rows, cols)."""
    fields = struct.unpack(">" + "i" * (1 + ndims), _read_exact(f, 4 * (1 + ndims), what))
    if fields[0] != expected_magic:
        raise ValueError(f"{what}: not an IDX file of the expected kind (magic {fields[0]}, want {expected_magic})")
    return tuple(fields[1:])


def fashion_mnist_count(split: str = "train", root: str | None = None, **_render_opts: Any) -> int:
    """Number of samples, read from the IDX headers (checks images and labels agree). Extra options
    are ignored, as in count_emoji."""
    images, labels = _fashion_files(split, root)
    fs_i, p_i = storage.fs_and_path(images)
    fs_l, p_l = storage.fs_and_path(labels)
    with fs_i.open(p_i, "rb") as raw_i, gzip.GzipFile(fileobj=raw_i) as fi:
        n_img = _idx_header(fi, _IMAGES_MAGIC, 3, images)[0]
    with fs_l.open(p_l, "rb") as raw_l, gzip.GzipFile(fileobj=raw_l) as fl:
        n_lab = _idx_header(fl, _LABELS_MAGIC, 1, labels)[0]
    if n_img != n_lab:
        raise ValueError(f"Fashion-MNIST {split}: {n_img} images but {n_lab} labels")
    return n_img


def fashion_mnist_caption(label: int, index: int) -> str:
    """Template chosen by the sample index: deterministic and evenly spread over classes."""
    template = FASHION_MNIST_TEMPLATES[index % len(FASHION_MNIST_TEMPLATES)]
    c = FASHION_MNIST_CLASSES[label].lower()
    return template.format(a="an" if c[0] in "aeiou" else "a", c=c)


def iter_fashion_mnist(
    split: str = "train", limit: int | None = None, *, root: str | None = None
) -> Iterator[Sample]:
    """Fashion-MNIST of `split` as (key, png_bytes (28x28 grey), caption, meta{label, class_name}).

    Streams the gzip files (one image at a time), so `limit` is cheap and memory stays flat. Missing
    files raise FileNotFoundError here, at the call, not at the first next().
    """
    images, labels = _fashion_files(split, root)
    return _fashion_samples(split, limit, images, labels)


def _fashion_samples(split: str, limit: int | None, images: str, labels: str) -> Iterator[Sample]:
    fs_i, p_i = storage.fs_and_path(images)
    fs_l, p_l = storage.fs_and_path(labels)
    with fs_i.open(p_i, "rb") as raw_i, gzip.GzipFile(fileobj=raw_i) as fi, \
            fs_l.open(p_l, "rb") as raw_l, gzip.GzipFile(fileobj=raw_l) as fl:
        n, rows, cols = _idx_header(fi, _IMAGES_MAGIC, 3, images)
        (n_lab,) = _idx_header(fl, _LABELS_MAGIC, 1, labels)
        if n != n_lab:
            raise ValueError(f"Fashion-MNIST {split}: {n} images but {n_lab} labels")
        total = n if limit is None else min(n, max(0, limit))
        width = int(math.log10(max(n, 1))) + 1
        for i in range(total):
            pixels = np.frombuffer(_read_exact(fi, rows * cols, images), dtype=np.uint8).reshape(rows, cols)
            label = _read_exact(fl, 1, labels)[0]
            if label >= len(FASHION_MNIST_CLASSES):
                raise ValueError(f"{labels}: label {label} at index {i} out of range")
            meta = {
                "dataset": "fashion_mnist",
                "label": int(label),
                "class_name": FASHION_MNIST_CLASSES[label],
                "index": i,
                "split": split,
            }
            key = f"fmnist_{split}_{i:0{width}d}"
            yield key, png_bytes(Image.fromarray(pixels, "L")), fashion_mnist_caption(label, i), meta

