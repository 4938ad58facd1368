"""The training sample order (pipeline.train.data): a function of (seed, epoch, rank) alone, and an
audit of the per-rank records that finds a missing, repeated or misplaced sample."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import storage
from pipeline.train import data

KEYS = np.array([f"k{i:03d}" for i in range(37)])


def _table() -> dict:
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(len(KEYS))  # as files and blocks might deliver them
    return data.sort_by_key({"key": KEYS[shuffled], "x": shuffled.astype(np.float32)})


def test_order_depends_on_seed_and_epoch_only() -> None:
    a, b = data.epoch_order(3, 1, 37), data.epoch_order(3, 1, 37)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(37))
    assert not np.array_equal(a, data.epoch_order(3, 2, 37))
    assert not np.array_equal(a, data.epoch_order(4, 1, 37))


def test_sort_by_key_makes_the_table_independent_of_arrival_order() -> None:
    t = _table()
    assert t["key"].tolist() == sorted(KEYS.tolist())
    assert all(f"k{int(x):03d}" == k for x, k in zip(t["x"], t["key"]))  # rows kept together
    with pytest.raises(ValueError, match="unique keys.*k001"):
        data.sort_by_key({"key": np.array(["k001", "k000", "k001"])})


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_split_each_global_batch_whatever_the_worker_count(world: int) -> None:
    t = _table()
    one = list(data.iter_rank_batches(t, 0, 5, 8, 0, 1))
    ranks = [list(data.iter_rank_batches(t, 0, 5, 8, r, world)) for r in range(world)]
    assert len(one) == data.batches_per_epoch(37, 8) == 4 and all(len(r) == 4 for r in ranks)
    for b in range(4):
        together = np.concatenate([ranks[r][b]["key"] for r in range(world)])
        assert together.tolist() == one[b]["key"].tolist()  # same samples, same order
    seen = np.concatenate([b["key"] for b in one])
    assert len(set(seen.tolist())) == 32  # no repeat within an epoch; the 5 left over wait for another epoch


def _record(prefix: str, attempt: str, world: int, batches, epoch: int = 0, tamper=None) -> None:
    t = _table()
    for rank in range(world):
        log = data.SampleLog(prefix, attempt, rank, world)
        for b in data.iter_rank_batches(t, 0, epoch, 8, rank, world):
            if b["_batch"] in batches:
                keys = b["key"].tolist()
                if tamper:
                    keys = tamper(b["_batch"], rank, keys)
                log.add(b["_batch"] + 1, epoch, b["_batch"], keys)
        log.write(max(batches) + 1)


def test_audit_of_an_interrupted_run(tmp_path) -> None:
    """Attempt A trained batches 0-2 but its last checkpoint was after batch 1: its batch 2 does not
    count; attempt B (one rank fewer) resumed at batch 2 and finished the epoch."""
    prefix = str(tmp_path / "samples")
    _record(prefix, "a" * 12, 2, {0, 1, 2})
    _record(prefix, "b" * 12, 1, {2, 3})
    starts = [{"attempt": "a" * 12, "epoch": 0, "batch_in_epoch": 0}, {"attempt": "b" * 12, "epoch": 0, "batch_in_epoch": 2}]
    (e,) = data.audit(prefix, starts, sorted(KEYS.tolist()), 0, 8).values()
    assert e == {"batches": 4, "first_batch": 0, "last_batch": 3, "samples": 32, "distinct": 32, "missing": [],
                 "repeated": [], "wrong_batches": [], "complete": True}
    # Had B resumed from the start of the epoch instead, A's batch 2 would count as well as B's: twice.
    wrong_cut = [starts[0], {"attempt": "b" * 12, "epoch": 0, "batch_in_epoch": 3}]
    assert len(data.audit(prefix, wrong_cut, sorted(KEYS.tolist()), 0, 8)[0]["repeated"]) == 8


def test_audit_finds_missing_repeated_and_misplaced_samples(tmp_path) -> None:
    keys = sorted(KEYS.tolist())
    starts = [{"attempt": "c" * 12, "epoch": 0, "batch_in_epoch": 0}]
    missing = str(tmp_path / "missing")
    _record(missing, "c" * 12, 2, {0, 1, 3})  # batch 2 never recorded
    e = data.audit(missing, starts, keys, 0, 8)[0]
    assert len(e["missing"]) == 8 and not e["complete"]
    swapped = str(tmp_path / "swapped")  # rank 1 of batch 1 trained on batch 0's samples
    batch0_rank1 = next(data.iter_rank_batches(_table(), 0, 0, 8, 1, 2))["key"].tolist()
    _record(swapped, "c" * 12, 2, {0, 1, 2, 3}, tamper=lambda b, r, k: batch0_rank1 if (b, r) == (1, 1) else k)
    e = data.audit(swapped, starts, keys, 0, 8)[0]
    assert e["wrong_batches"] == [1] and len(e["repeated"]) == 4 and len(e["missing"]) == 4
    assert storage.ls(swapped)  # the records really are files the audit read back


def test_a_batch_trained_twice_by_same_sized_attempts_is_repeated(tmp_path) -> None:
    """Two attempts of the same worker count both count batch 1 (the second claims to have resumed at
    it, the first's cut says it was still valid): its samples were trained twice, and say so."""
    prefix = str(tmp_path / "twice")
    _record(prefix, "d" * 12, 2, {0, 1})
    _record(prefix, "e" * 12, 2, {1, 2, 3})
    honest = [{"attempt": "d" * 12, "epoch": 0, "batch_in_epoch": 0}, {"attempt": "e" * 12, "epoch": 0, "batch_in_epoch": 1}]
    assert data.audit(prefix, honest, sorted(KEYS.tolist()), 0, 8)[0]["repeated"] == []
    overlapping = [honest[0], {"attempt": "e" * 12, "epoch": 0, "batch_in_epoch": 2}]  # but it also trained batch 1
    assert len(data.audit(prefix, overlapping, sorted(KEYS.tolist()), 0, 8)[0]["repeated"]) == 8
    # A later attempt that resumed further back cuts every earlier one there, not just its neighbour.
    three = [honest[0], {"attempt": "e" * 12, "epoch": 0, "batch_in_epoch": 1}, {"attempt": "f" * 12, "epoch": 0, "batch_in_epoch": 0}]
    e = data.audit(prefix, three, sorted(KEYS.tolist()), 0, 8)
    assert e == {}  # nothing counts: the last attempt (which recorded nothing) restarted the epoch
