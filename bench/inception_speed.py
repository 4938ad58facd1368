"""Speed of the FID Inception on this machine at several batch sizes, side by side.

    .venv/bin/python bench/inception_speed.py [--images 200] [--threads N] [--batch-sizes 25 50 100]

FID's cost is dominated by this network (299 px inputs); `fid.batch_size` picks the chunking and
does not change the features. Prints images/s per batch size and the ratio to the first one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> dict[int, float]:
    import numpy as np
    import torch

    from pipeline.eval import fid

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[25, 50, 100])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    fid.inception_features(images[:5], batch_size=5)  # load the network, warm up
    speed = {}
    for bs in args.batch_sizes:
        t0 = time.perf_counter()
        fid.inception_features(images, batch_size=bs)
        speed[bs] = args.images / (time.perf_counter() - t0)
        base = speed[args.batch_sizes[0]]
        print(f"batch {bs:4d}: {speed[bs]:6.2f} images/s  ({speed[bs] / base:.2f}x batch {args.batch_sizes[0]}), "
              f"{args.threads} threads", flush=True)
    return speed


if __name__ == "__main__":
    main()
