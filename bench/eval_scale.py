"""Generate + evaluate at growing image counts: the driver's peak RSS (expected flat: no pixels reach
it), then the scoring pool's throughput (Inception, wall images/s) with 1 and with 2 actors, A/B
interleaved on the same images.

    .venv/bin/python bench/eval_scale.py [--images 256,4096,256] [--actors 1,2,1,2] [--score-images 256]
                                         [--run-dir runs/eval_scale] [key=value ...]

Starts its own S3 server and Ray head under RUN_DIR (this process is the driver), ingests and encodes
configs/tiny.yaml's data, trains 2 steps (the images need weights, not quality), then for each count
runs the generate job's evaluation (FID on, ddim 2 steps, guidance 1; a new count makes its images
anew) while a thread samples this process's RSS every 50 ms. On CPU the Inception network dominates: about 3
images/s per actor on one core, so 4,096 images take about 20 minutes per actor.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _args(p) -> None:
    p.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "eval_scale"))
    p.add_argument("--images", default="256,4096,256", help="generated images per evaluation, in this order")
    p.add_argument("--actors", default="1,2,1,2", help="scoring pool sizes to time, in this order")
    p.add_argument("--score-images", type=int, default=256, help="images scored per throughput measurement")


class PeakRSS:
    """The peak resident set size of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        import psutil

        self.proc, self.start, self.peak, self._stop = psutil.Process(), 0, 0, threading.Event()
        self.start = self.peak = self.proc.memory_info().rss

        def sample():
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, self.proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def main(argv=None) -> dict:
    from jobs.demo import local_driver
    from pipeline import cli, config, paths
    from pipeline.data.encode import encode
    from pipeline.data.ingest import ingest
    from pipeline.eval import scoring
    from pipeline.eval.run import run as generate_and_evaluate
    from pipeline.train.trainer import fit

    argv = list(sys.argv[1:] if argv is None else argv)
    _, args = cli.parse(__doc__, argv, extra=_args)
    cli.setup_logging()
    counts = [int(n) for n in args.images.split(",")]
    base = [f"run.storage=s3://rld/eval-scale-{uuid.uuid4().hex[:8]}", "vae.source=random", "train.steps=2",
            "train.num_workers=1", "train.checkpoint_every=2", "generate.sampler=ddim", "generate.steps=2",
            "generate.guidance_scale=1", "generate.batch_size=64", "eval.report=false", "fid.batch_size=32",
            *args.overrides]
    cfg = config.load(TINY, base)
    memory, speed = [], []
    with local_driver(cfg, os.path.abspath(args.run_dir)):
        ingest(cfg)
        encode(cfg)
        fit(cfg)
        for n in counts:
            run_cfg = config.load(TINY, base + [f"generate.num_images={n}"])  # another count: made anew
            t0 = time.time()
            with PeakRSS() as rss:
                out = generate_and_evaluate(run_cfg, report=False)
            memory.append({"images": n, "driver_rss_before_mb": round(rss.start / 2**20),
                           "driver_peak_rss_mb": round(rss.peak / 2**20), "seconds": round(time.time() - t0, 1),
                           "fid": round(out["fid"]["fid"], 3)})
            print(f"eval_scale: {memory[-1]}", flush=True)
        out_uri = paths.outputs(cfg) + "/generate"  # the last evaluation's images
        n = min(args.score_images, counts[-1])
        # One generate batch (64 images) per chunk: enough chunks to keep two actors busy.
        chunks = scoring.image_chunks("bench", out_uri, ["-"] * n, cfg.generate.batch_size, cfg.generate.batch_size)
        for actors in (int(a) for a in args.actors.split(",")):
            score_cfg = config.load(TINY, base + [f"fid.num_actors={actors}"])
            t0 = time.time()
            scored = scoring.score_chunks(score_cfg, chunks)["bench"]
            wall = time.time() - t0
            speed.append({"actors": actors, "images": n, "chunks": len(chunks), "wall_s": round(wall, 1),
                          "images_per_s": round(n / wall, 2), "per_actor_images_per_s": scored["images_per_s"]})
            print(f"eval_scale: {speed[-1]}", flush=True)

    print("\n=== driver peak RSS by generated images (generate + FID) ===")
    for m in memory:
        print(f"{m['images']:>6} images: peak {m['driver_peak_rss_mb']:>5} MB (before {m['driver_rss_before_mb']} MB), "
              f"{m['seconds']} s, FID {m['fid']}")
    print("\n=== scoring throughput (wall, pool start included) ===")
    by = {}
    for s in speed:
        by.setdefault(s["actors"], []).append(s["images_per_s"])
        print(f"{s['actors']} actor(s): {s['images_per_s']} images/s ({s['images']} images in {s['wall_s']} s; "
              f"per actor {s['per_actor_images_per_s']})")
    if 1 in by and 2 in by:
        ratio = (sum(by[2]) / len(by[2])) / (sum(by[1]) / len(by[1]))
        print(f"2 actors / 1 actor: {ratio:.2f}x (on {os.cpu_count()} cores)")
    return {"memory": memory, "speed": speed}


if __name__ == "__main__":
    main()
