"""One-off check that pipeline.eval.fid reproduces a known FID (not part of the test suite).

NOTES.md ("FID Inception") records, for NVIDIA's recipe: Fashion-MNIST test set, first 5,000
images vs the last 5,000, zero-padded 28 -> 32, grey repeated to RGB: FID 4.88. Getting that
number back proves the resize / scaling / statistics match the reference; a preprocessing slip
(half-pixel resize, [-1, 1] scaling, PIL resize) moves it by far more than the 0.3 allowed here.

Takes about 14 minutes on 2 CPU cores (10,000 images through Inception plus one 2048-d sqrtm):

    HF_HUB_OFFLINE=1 nohup python bench/fid_reference.py > /tmp/fid_ref.log 2>&1 &
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.eval import fid  # noqa: E402

EXPECTED = 4.88
TOLERANCE = 0.3


def load_fashion_mnist_test(path: str) -> np.ndarray:
    """uint8 [10000, 32, 32, 3]: IDX images (16-byte header), zero-padded 28 -> 32, grey -> RGB."""
    with gzip.open(path, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    imgs = raw.reshape(-1, 28, 28)
    imgs = np.pad(imgs, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(imgs[..., None], 3, axis=-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    ap.add_argument("--n", type=int, default=5000, help="images per half (5000 for the reference figure)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    imgs = load_fashion_mnist_test(args.images)
    a, b = imgs[: args.n], imgs[-args.n:]
    print(f"{len(imgs)} images {imgs.shape[1:]} {imgs.dtype}; halves of {args.n}", flush=True)

    def batches(x: np.ndarray, name: str):
        t0 = time.time()
        for i in range(0, len(x), args.batch_size):
            yield x[i:i + args.batch_size]
            done = min(i + args.batch_size, len(x))
            if done % 1000 == 0 or done == len(x):
                print(f"  {name}: {done}/{len(x)} images, {done / (time.time() - t0):.1f} img/s", flush=True)

    t0 = time.time()
    stats_a = fid.FeatureStats.from_features(fid.inception_features(batches(a, "first"), args.batch_size))
    stats_b = fid.FeatureStats.from_features(fid.inception_features(batches(b, "last"), args.batch_size))
    t1 = time.time()
    value = fid.frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)
    t2 = time.time()
    print(f"features {t1 - t0:.0f} s, sqrtm {t2 - t1:.0f} s")
    print(f"FID(first {args.n} test, last {args.n} test) = {value:.4f}  (reference {EXPECTED} for n=5000)")
    if args.n == 5000:
        ok = abs(value - EXPECTED) <= TOLERANCE
        print("OK" if ok else f"MISMATCH: off by more than {TOLERANCE}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
