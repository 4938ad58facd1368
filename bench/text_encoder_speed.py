"""The text encoder on a dataset's captions: encode() (each distinct caption once, padded to the
longest) against padding every caption to max_length, A/B interleaved, on the same threads.

    .venv/bin/python bench/text_encoder_speed.py [--config configs/demo.yaml] [--captions 1024]
        [--batch 128] [--rounds 5] [--threads 1] [key=value ...]

The captions are the first `--captions` of the config's built-in dataset (train split), in batches
of `--batch` as encode's actors see them (encode.batch_size). Prints per round the seconds of each,
then the median [min-max] speed-up and the largest difference between the two outputs. Encode's
actors run one torch thread each, hence `--threads 1`. A benchmark, not a test.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _args(p) -> None:
    p.add_argument("--captions", type=int, default=1024)
    p.add_argument("--batch", type=int, default=0, help="default: encode.batch_size")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)


def full_padding(text, captions: list[str]):
    """The encoder as it ran before: every caption padded to max_length, every row through the model."""
    import torch

    tok = text.tokenizer(captions, padding="max_length", truncation=True, max_length=text.max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = text.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    return hidden * tok["attention_mask"].unsqueeze(-1), tok["attention_mask"]


def main(argv=None) -> dict:
    import torch

    from pipeline import cli
    from pipeline.data import sources
    from pipeline.data.ingest import source_options
    from pipeline.models.text import build_text_encoder

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", os.path.join(ROOT, "configs", "demo.yaml")] + argv
    cfg, args = cli.parse(__doc__, argv, extra=_args)
    torch.set_num_threads(args.threads)
    batch = args.batch or cfg.encode.batch_size
    captions = [s[2] for s in sources.iter_source(cfg.data.source, "train", limit=args.captions, **source_options(cfg))]
    batches = [captions[i:i + batch] for i in range(0, len(captions), batch)]
    text = build_text_encoder(cfg.text_encoder, cfg.run.seed)
    print(f"{len(captions)} captions ({len(set(captions))} distinct) in {len(batches)} batches of {batch}; "
          f"max_length {text.max_length}; {text.identity['name']}; {args.threads} thread(s)")
    text.encode(batches[0]), full_padding(text, batches[0])  # warm-up
    variants = {"full_padding": full_padding, "encode": lambda t, b: t.encode(b)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    diff = 0.0
    for r in range(args.rounds):
        outs = {}
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):  # A/B, then B/A
            t0 = time.perf_counter()
            outs[name] = [variants[name](text, b) for b in batches]
            times[name].append(time.perf_counter() - t0)
        diff = max(diff, max(float((a[0] - b[0]).abs().max()) for a, b in zip(outs["encode"], outs["full_padding"])))
        print(f"round {r}: full padding {times['full_padding'][-1]:.2f} s, encode {times['encode'][-1]:.2f} s", flush=True)
    ratios = [a / b for a, b in zip(times["full_padding"], times["encode"])]
    print(f"\n=== text encoder: encode() is {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] "
          f"faster than full padding ({len(captions) / statistics.median(times['encode']):.0f} vs "
          f"{len(captions) / statistics.median(times['full_padding']):.0f} captions/s); largest difference {diff:.2e}")
    return {"ratios": ratios, "max_abs_diff": diff, **times}


if __name__ == "__main__":
    main()
