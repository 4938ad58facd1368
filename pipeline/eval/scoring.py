"""Image metrics on a Ray Data actor pool, reduced to sufficient statistics merged on the driver.

A *chunk* is a run of images read by one actor call: a range of a generate output's PNGs, or one raw
shard of a split (the FID reference). `ImageScorer` (Inception, and for generated sets the prompt
classifier and the nearest-training-image search) turns a chunk into one `Partial`: the Inception
feature moments (count, sum, sum of outer products; float64), the classifier's confusion counts and
the nearest-match hit counts. Partials add up, so the driver holds one per image set whatever the
number of images, and never a pixel. Partials are merged in chunk order (Ray Data's preserve_order),
so the same chunks give bitwise the same statistics on every run.

The reference statistics are the same code over the test split's shards, cached in storage under the
split's identity (shard names and sizes, image size, limit): a cache hit reads nothing else.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline import paths, storage
from pipeline.devices import resolve_use_gpu, start_whole_pool
from pipeline.eval import fid

REFERENCE = "reference"  # the set name of the reference images' chunks
NUM_CLASSES = 10  # the prompt classifier's (Fashion-MNIST); checked against it in tests


@dataclass
class Partial:
    """Additive statistics of some images of one set."""

    moments: fid.FeatureMoments
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((NUM_CLASSES,) * 2, np.int64))  # asked x predicted
    unlabelled: int = 0  # images whose prompt names no class (not scored by the classifier)
    near_n: int = 0  # images whose prompt is a caption of the nearest-match reference set
    near_hits: int = 0  # ... whose nearest reference image has that caption
    near_chance: float = 0.0  # sum over those images of P(a random reference image has the caption)

    def merge(self, other: "Partial") -> "Partial":
        return Partial(self.moments.merge(other.moments), self.confusion + other.confusion,
                       self.unlabelled + other.unlabelled, self.near_n + other.near_n,
                       self.near_hits + other.near_hits, self.near_chance + other.near_chance)


def pool_features(images: np.ndarray, pool: int = 2) -> np.ndarray:
    """Pixels in [0, 1] after `pool` x `pool` average pooling (a shift of a pixel costs little), flat."""
    n, h, w, c = images.shape
    x = images[:, : h // pool * pool, : w // pool * pool].astype(np.float32) / 255.0
    return x.reshape(n, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4)).reshape(n, -1)


class NearestMatch:
    """Is each image nearest (L2 over pooled pixels) to a reference image captioned with its prompt?
    A retrieval check for datasets that show each caption many times (the demo's emoji renders)."""

    def __init__(self, ref_images: np.ndarray, ref_captions: list[str]):
        self.captions = list(ref_captions)
        self.counts = Counter(self.captions)
        self.ref = np.concatenate([pool_features(ref_images[i:i + 512]) for i in range(0, len(ref_images), 512)])
        self.ref_sq = (self.ref * self.ref).sum(1)

    def score(self, images: np.ndarray, prompts: list[str]) -> tuple[int, int, float]:
        """(images whose prompt is a reference caption, hits among them, summed chance of a hit)."""
        idx = [i for i, p in enumerate(prompts) if p in self.counts]
        hits = 0
        for start in range(0, len(idx), 256):  # bounded memory: 256 x n_ref distances at a time
            part = idx[start:start + 256]
            g = pool_features(images[part])
            nearest = (self.ref_sq[None, :] - 2.0 * g @ self.ref.T).argmin(axis=1)
            hits += sum(self.captions[j] == prompts[i] for i, j in zip(part, nearest))
        chance = sum(self.counts[prompts[i]] / len(self.captions) for i in idx)
        return len(idx), int(hits), float(chance)


class ImageScorer:
    """Ray Data callable class: one chunk (a JSON job row) in, its Partial out (as arrays)."""

    def __init__(self, cfg_dict: dict, classify: bool, nearest_images: int):
        import torch

        from pipeline.config import from_dict
        from pipeline.data.readers import split_records

        self.cfg = cfg = from_dict(cfg_dict)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # Inception loads on first use
        self.classifier = prompt_classifier(cfg)[0] if classify else None  # trained (cached) before the pool
        self.nearest = NearestMatch(*split_records(cfg, "train", nearest_images)) if nearest_images else None
        self.near_ref = len(self.nearest.captions) if self.nearest else 0

    def _load(self, job: dict) -> tuple[np.ndarray, list[str] | None]:
        if job["kind"] == "shard":
            from pipeline.data.readers import shard_records

            records = list(shard_records(storage.read_bytes(job["uri"]), job["uri"], self.cfg.data))
            records = records[: job["take"]] if job["take"] >= 0 else records
            if not records:  # a shard of rejects only: nothing to add
                size = self.cfg.data.image_size
                return np.zeros((0, size, size, 3), np.uint8), None
            return np.stack([image for _, image, _ in records]), None
        from pipeline.eval.generate import read_images

        return read_images(job["out"], range(job["start"], job["stop"])), job["prompts"]

    def __call__(self, row: dict) -> dict:
        from pipeline.eval import classifier as clf

        job = json.loads(str(row["job"][0]))
        t0 = time.perf_counter()
        images, prompts = self._load(job)
        m = (fid.FeatureMoments.of(fid.inception_features(images, self.cfg.fid.batch_size, self.device))
             if job.get("features", True) else fid.FeatureMoments.zero())
        part = Partial(m)
        if prompts is not None and self.classifier is not None and job.get("classify", True):
            asked = [clf.label_from_prompt(p) for p in prompts]
            idx = [i for i, a in enumerate(asked) if a is not None]
            if idx:
                pred = clf.predict(self.classifier, images[idx])
                np.add.at(part.confusion, (np.array([asked[i] for i in idx]), pred), 1)
            part.unlabelled = len(prompts) - len(idx)
        if prompts is not None and self.nearest is not None and job.get("nearest", True):
            part.near_n, part.near_hits, part.near_chance = self.nearest.score(images, prompts)
        dt = time.perf_counter() - t0
        return {"set": [job["set"]], "chunk": [job["chunk"]], "count": [m.count], "total": m.total[None],
                "outer": m.outer[None], "confusion": part.confusion[None], "unlabelled": [part.unlabelled],
                "near": np.array([[part.near_n, part.near_hits, part.near_chance]]), "near_ref": [self.near_ref],
                "images": [len(images)], "seconds": [dt]}


def _as_partial(row: dict) -> Partial:
    n, hits, chance = row["near"]
    return Partial(fid.FeatureMoments(int(row["count"]), np.asarray(row["total"]), np.asarray(row["outer"])),
                   np.asarray(row["confusion"], np.int64), int(row["unlabelled"]), int(n), int(hits), float(chance))


def score_chunks(cfg, chunks: list[dict], classify: bool = False, nearest_images: int = 0) -> dict[str, dict]:
    """Every chunk through one ImageScorer pool (fid.num_actors actors, a GPU each when asked);
    returns {set: {"partial": Partial, "images_per_s": per actor, "near_ref": nearest-match reference
    images}} merged in chunk order."""
    import ray

    ds = ray.data.from_items([{"job": json.dumps({**c, "chunk": i})} for i, c in enumerate(chunks)],
                             override_num_blocks=len(chunks))
    ds = ds.map_batches(ImageScorer, fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "classify": classify,
                                                            "nearest_images": nearest_images},
                        batch_size=1, concurrency=cfg.fid.num_actors,
                        num_gpus=1 if resolve_use_gpu(cfg.fid.use_gpu) else 0, batch_format="numpy")
    ds.context.execution_options.preserve_order = True  # merge order fixed: the same bits on every run
    start_whole_pool(ds)
    merged: dict[str, dict] = {}
    for row in ds.iter_rows():  # one row per chunk, in chunk order: 32 MB of moments each, then dropped
        part = _as_partial(row)
        entry = merged.setdefault(str(row["set"]), {"partial": None, "seconds": 0.0, "images": 0})
        entry["partial"] = part if entry["partial"] is None else entry["partial"].merge(part)
        entry["seconds"] += float(row["seconds"])
        entry["images"] += int(row["images"])
        entry["near_ref"] = int(row["near_ref"])
    for entry in merged.values():
        entry["images_per_s"] = round(entry["images"] / entry.pop("seconds"), 3)
    return merged


def image_chunks(set_name: str, out: str, prompts: list[str], chunk_images: int, batch_size: int,
                 features: bool = True, classify: bool = True, nearest: bool = True) -> list[dict]:
    """A generate output's images as chunks of about chunk_images (whole generate batches), each
    saying which metrics it wants: Inception features, the classifier, the nearest-match search."""
    if set_name == REFERENCE:
        raise ValueError(f"{REFERENCE!r} names the reference set's chunks: choose another set name")
    step = max(batch_size, chunk_images // batch_size * batch_size)
    return [{"set": set_name, "kind": "pngs", "out": out, "start": a, "stop": min(a + step, len(prompts)),
             "prompts": prompts[a:a + step], "features": features, "classify": classify, "nearest": nearest}
            for a in range(0, len(prompts), step)]


def _count_usable(rows: dict) -> dict:
    """Ray task: usable records per raw shard (a reference limited to its first n images needs them)."""
    from pipeline.config import from_dict
    from pipeline.data.readers import shard_records

    cfg = from_dict(json.loads(str(rows["cfg"][0])))
    counts = [sum(1 for _ in shard_records(storage.read_bytes(str(u)), str(u), cfg.data)) for u in rows["uri"]]
    return {"uri": rows["uri"], "usable": np.array(counts)}


def reference_chunks(cfg, split: str, limit: int) -> list[dict]:
    """One chunk per shard of the split; with a limit, the first `limit` usable images in shard order."""
    import ray

    from pipeline.data.readers import list_split_shards

    shards = list_split_shards(cfg, split)
    if not limit:
        return [{"set": REFERENCE, "kind": "shard", "uri": u, "take": -1} for u in shards]
    ds = ray.data.from_items([{"uri": u, "cfg": json.dumps(cfg.to_dict())} for u in shards],
                             override_num_blocks=len(shards))
    usable = {str(r["uri"]): int(r["usable"]) for r in ds.map_batches(_count_usable, batch_size=4).take_all()}
    chunks, left = [], limit
    for u in shards:
        if left > 0 and usable[u]:
            chunks.append({"set": REFERENCE, "kind": "shard", "uri": u, "take": min(left, usable[u])})
            left -= chunks[-1]["take"]
    return chunks


def cached_reference(cfg, split: str = "test") -> tuple[fid.FeatureStats | None, str, dict]:
    """(statistics or None, cache URI, identity) of the split's first fid.n_ref usable images (0: all),
    cached in storage under a hash of the split's identity: a hit lists the shards and reads one object."""
    from pipeline.data.readers import split_identity

    identity = split_identity(cfg, split, cfg.fid.n_ref) | {"recipe": fid.FEATURE_RECIPE}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    cache_uri = paths.fid_stats(cfg, key)
    return fid.read_cached_stats(cache_uri, identity), cache_uri, identity


def store_reference(merged: dict, cache_uri: str, identity: dict) -> fid.FeatureStats:
    """The reference set's merged scores (score_chunks) as statistics, written to the cache."""
    stats = merged["partial"].moments.stats(identity)
    storage.write_verified(cache_uri, stats.to_bytes())
    print(f"fid: reference statistics of {stats.count} {identity['split']} images at {merged['images_per_s']} "
          f"images/s per actor -> {cache_uri}", flush=True)
    return stats


def reference_stats(cfg, split: str = "test") -> tuple[fid.FeatureStats, str, dict]:
    """cached_reference, computed (one actor pool over the split's shards) and cached on a miss."""
    stats, cache_uri, identity = cached_reference(cfg, split)
    if stats is None:
        stats = store_reference(score_chunks(cfg, reference_chunks(cfg, split, cfg.fid.n_ref))[REFERENCE],
                                cache_uri, identity)
    return stats, cache_uri, identity


def has_classifier(cfg) -> bool:
    """eval.classifier against the dataset: only Fashion-MNIST has one."""
    return cfg.eval.classifier == "yes" or (cfg.eval.classifier == "auto" and cfg.data.source == "fashion_mnist")


def prompt_classifier(cfg):
    """The Fashion-MNIST classifier (trained once on the train split, cached in storage), or
    (None, None) when this dataset has none."""
    if not has_classifier(cfg):
        return None, None
    from pipeline.eval import classifier as clf

    root = cfg.data.source_dir or None
    size = cfg.data.image_size
    identity = {"dataset": "fashion_mnist", "split": "train", "size": size, "root": root or "default"}
    uri = paths.classifier(cfg, size)
    return clf.load_or_train(
        uri, identity,
        data_fn=lambda: clf.fashion_arrays("train", size=size, root=root)[:2],
        test_fn=lambda: clf.fashion_arrays("test", size=size, root=root)[:2],
    )


def prompt_accuracy_of(part: Partial) -> dict:
    """prompt_accuracy's figures (pipeline/eval/classifier.py) from a Partial's confusion counts."""
    from pipeline.eval import classifier as clf

    conf = part.confusion
    per_class = {name: (float(conf[c, c] / conf[c].sum()) if conf[c].sum() else None)
                 for c, name in enumerate(clf.CLASS_NAMES)}
    n, correct = int(conf.sum()), int(np.trace(conf))
    return {"accuracy": correct / n if n else float("nan"), "correct": correct, "n": n,
            "unlabelled": part.unlabelled, "per_class": per_class,
            "per_class_n": {name: int(conf[c].sum()) for c, name in enumerate(clf.CLASS_NAMES)}}


def nearest_match_of(part: Partial, n_ref: int) -> dict:
    if not part.near_n:
        return {"n": 0, "accuracy": None, "note": "no prompt is a reference caption"}
    return {"n": part.near_n, "accuracy": part.near_hits / part.near_n, "n_ref": n_ref,
            "chance": part.near_chance / part.near_n}
