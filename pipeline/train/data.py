"""Which samples each training step sees: a function of (seed, epoch, rank) alone, and a record of it.

The training set is a table of N samples ordered by key. Epoch e visits them in the order
`epoch_order(seed, e, N)`; global batch b of that epoch is positions [b*B, (b+1)*B) of the order, and
rank r of W takes the r-th of its W equal slices. Nothing depends on Ray Data's execution order, the
node a worker runs on or how often the group was restarted, so a resumed run sees exactly the
batches an uninterrupted one would, and a run resumed with another worker count (2 -> 1) keeps the
global sample order (each global batch is the same set of samples, split in fewer slices).

Every rank records the keys of each batch it trained on (`SampleLog`), written next to the run's
outputs at each checkpoint; `audit` reads those records back and says, per epoch, which samples
were missed or seen twice. A record counts only up to the checkpoint the next attempt resumed
from: what a killed attempt trained on after its last checkpoint was lost with it, and redone.
Pure NumPy apart from `write`/`audit`, which use `pipeline.storage`.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter

import numpy as np

from pipeline import storage


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full global batches in an epoch (the remainder of the permutation is dropped, a new one each epoch)."""
    return n // batch_size


def rank_indices(order: np.ndarray, batch: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Rows of global batch `batch` that rank `rank` of `world` trains on."""
    per = batch_size // world
    start = batch * batch_size + rank * per
    return order[start:start + per]


def sort_by_key(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The table in key order (stable), so a sample's index does not depend on file or block order."""
    keys = np.asarray(arrays["key"]).astype(str)
    if len(np.unique(keys)) != len(keys):
        dup = [k for k, c in Counter(keys.tolist()).items() if c > 1][:5]
        raise ValueError(f"training samples must have unique keys; repeated: {dup}")
    idx = np.argsort(keys, kind="stable")
    return {k: (keys if k == "key" else np.asarray(v))[idx] for k, v in arrays.items()}


def iter_rank_batches(arrays: dict[str, np.ndarray], seed: int, epoch: int, batch_size: int, rank: int, world: int):
    """This rank's batches of `epoch`, each a dict of numpy arrays (with "key") plus "_batch", its
    global batch index within the epoch."""
    n = len(arrays["key"])
    order = epoch_order(seed, epoch, n)
    for b in range(batches_per_epoch(n, batch_size)):
        idx = rank_indices(order, b, batch_size, rank, world)
        yield {k: v[idx] for k, v in arrays.items()} | {"_batch": b}


# ------------------------------------------------------------------------------------------ the record

def new_attempt_id() -> str:
    return uuid.uuid4().hex[:12]


class SampleLog:
    """One rank's record of what it trained on: (step after it, epoch, global batch, keys) per batch,
    applied or skipped as non-finite, written as one JSON file per checkpoint under `prefix`."""

    def __init__(self, prefix: str, attempt: str, rank: int, world: int, node: str = "") -> None:
        self.prefix, self.attempt, self.rank, self.world, self.node = prefix, attempt, rank, world, node
        self.entries: list[list] = []

    def add(self, step: int, epoch: int, batch: int, keys) -> None:
        self.entries.append([int(step), int(epoch), int(batch), [str(k) for k in keys]])

    def write(self, step: int) -> str | None:
        """Write the entries since the last write; the name never collides with another attempt's."""
        if not self.entries:
            return None
        uri = storage.join(self.prefix, f"{self.attempt}-rank{self.rank:03d}-{step:08d}.json")
        storage.write_json(uri, {"attempt": self.attempt, "rank": self.rank, "world": self.world,
                                 "node": self.node, "entries": self.entries})
        self.entries = []
        return uri


_LOG_NAME = re.compile(r"^([0-9a-f]{12})-rank\d{3}-\d{8}\.json$")


def audit(prefix: str, starts: list[dict], keys, seed: int, batch_size: int) -> dict:
    """Read every SampleLog under `prefix` and check it against the order's promise.

    `starts`: the run's attempts in order ({"attempt", "epoch", "batch_in_epoch"}: where each one
    resumed, as the trainer records them). An attempt's entries count up to the data position the
    next attempt resumed from (what it trained on after its last checkpoint was redone). `keys`: the training
    set's keys in key order. Returns per epoch: batches recorded, samples trained on, keys repeated,
    keys missing (from the batches the order puts in the recorded range), and batches whose samples
    differ from what epoch_order says they are."""
    # An attempt's records count up to the earliest position any later attempt resumed from (a later
    # one may resume further back, e.g. when the newest checkpoints failed verification).
    cutoff, earliest = {}, (float("inf"), 0)
    for s in reversed(starts):
        cutoff[s["attempt"]] = earliest
        earliest = min(earliest, (s["epoch"], s["batch_in_epoch"]))
    seen: dict[tuple[int, int], dict[tuple[int, int], list[str]]] = {}  # (epoch, batch) -> (world, rank) -> keys
    extra: dict[tuple[int, int], list[str]] = {}  # keys of a slot recorded twice: trained twice
    for uri in storage.ls(prefix):
        m = _LOG_NAME.match(uri.rstrip("/").rsplit("/", 1)[-1])
        if not m or m.group(1) not in cutoff:
            continue
        rec = storage.read_json(uri)
        for step, epoch, batch, batch_keys in rec["entries"]:
            if (epoch, batch) >= cutoff[rec["attempt"]]:
                continue
            by_rank = seen.setdefault((epoch, batch), {})
            slot = (rec["world"], rec["rank"])
            if slot in by_rank:  # two counted records of one slot: that batch was trained twice
                extra.setdefault((epoch, batch), []).extend(batch_keys)
            else:
                by_rank[slot] = batch_keys
    keys = np.asarray(keys).astype(str)
    out: dict[int, dict] = {}
    for epoch in sorted({e for e, _ in seen}):
        order = epoch_order(seed, epoch, len(keys))
        batches = sorted(b for e, b in seen if e == epoch)
        counts: Counter = Counter()
        wrong = []
        for b in batches:
            got = [k for slot in sorted(seen[(epoch, b)]) for k in seen[(epoch, b)][slot]]
            counts.update(got + extra.get((epoch, b), []))
            if sorted(got) != sorted(keys[order[b * batch_size:(b + 1) * batch_size]].tolist()):
                wrong.append(b)
        expected = {k for b in range(batches[-1] + 1) for k in keys[order[b * batch_size:(b + 1) * batch_size]].tolist()}
        out[epoch] = {"batches": len(batches), "first_batch": batches[0], "last_batch": batches[-1],
                      "samples": sum(counts.values()), "distinct": len(counts),
                      "missing": sorted(expected - set(counts)), "repeated": sorted(k for k, c in counts.items() if c > 1),
                      "wrong_batches": wrong,
                      "complete": len(batches) == batches_per_epoch(len(keys), batch_size)}
    return out
