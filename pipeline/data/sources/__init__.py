"""Built-in datasets that work offline: each yields (key, png_bytes, caption, meta) samples.

Why these two: the project must run end to end with no network. Both come from installed packages
and give real image-text pairs:

* ``emoji`` (openmoji.py): OpenMoji glyphs captioned with their CLDR names;
* ``fashion_mnist`` (fashion_mnist.py): Fashion-MNIST from the Debian package, captioned by class.

One file per dataset; this registry is the only place that lists them. Samples are produced in a
deterministic order, so shards written from them are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pipeline.data.sources import fashion_mnist, openmoji
from pipeline.data.sources.base import SPLITS, Sample, check_split

__all__ = ["SOURCES", "SPLITS", "Sample", "count_source", "iter_source"]

# ---------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., Iterator[Sample]]] = {
    "emoji": openmoji.iter_emoji,
    "fashion_mnist": fashion_mnist.iter_fashion_mnist,
}

_COUNTERS: dict[str, Callable[..., int]] = {
    "emoji": openmoji.count_emoji,
    "fashion_mnist": fashion_mnist.fashion_mnist_count,
}


def _check_name(name: str) -> None:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}: expected one of {', '.join(sorted(SOURCES))}")


def iter_source(name: str, split: str, limit: int | None = None, **opts: Any) -> Iterator[Sample]:
    """Samples of a built-in source; `opts` go to the source (e.g. size=, root=, caption_templates=).
    Name and split are checked eagerly, so a typo fails at the call, not at the first next()."""
    _check_name(name)
    check_split(split)
    return SOURCES[name](split, limit, **opts)


def count_source(name: str, split: str, **opts: Any) -> int:
    """Number of samples `iter_source(name, split)` yields without a limit, without producing them."""
    _check_name(name)
    return _COUNTERS[name](split, **opts)
