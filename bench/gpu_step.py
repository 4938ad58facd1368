"""The denoiser's train step on one GPU, without Ray: step time, samples/s, peak memory and MFU for the
cluster UNet (configs/cluster_sd256.yaml) and the cluster DiT (configs/cluster_dit256.yaml, XL/2) at
32x32x4 latents (256 px images) and 77 x 768 text states (T5 v1.1 base), bf16 autocast, TF32, fused AdamW.

    python bench/gpu_step.py [--arch unet dit] [--batch 64] [--steps 20] [--warmup 5] [--compile]
                             [--gradient-checkpointing] [--device cuda] [key=value ...]

Needs torch, diffusers, transformers and PyYAML only (no Ray, no storage): the step is
pipeline.train.step.train_step itself, on random latents. FLOPs per step are counted once with
torch.utils.flop_counter (forward + backward of the model; the optimizer and EMA are not counted),
and MFU = FLOPs per step / step time / the device's dense bf16 peak from PEAK_BF16_TFLOPS (matched by
name; unknown devices print no MFU). `--device cpu --arch tiny` is a smoke run for machines without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}
"""Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets; H100 is the SXM part."""

CONFIGS = {"unet": "cluster_sd256.yaml", "dit": "cluster_dit256.yaml", "tiny": "tiny.yaml"}
LATENT, TEXT = [4, 32, 32], [77, 768]


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops
    return None


def measure(arch: str, args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline import config
    from pipeline.train.step import build_train_state, train_step

    overrides = [f"train.batch_size={args.batch}", f"train.compile={str(args.compile).lower()}",
                 f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}", "train.warmup_steps=0",
                 *args.overrides]
    if arch == "tiny":
        overrides += ["denoiser.arch=dit", "denoiser.dit_size=tiny"]
    cfg = config.load(os.path.join(ROOT, "configs", CONFIGS[arch]), overrides)
    latent, text = ([4, 8, 8], [16, 32]) if arch == "tiny" else (LATENT, TEXT)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    manifest = {"latent_shape": latent, "text_shape": text}
    state = build_train_state(cfg, manifest, torch.zeros(text), torch.ones(text[0], dtype=torch.int64),
                              wrap=lambda m: m.to(device))
    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(args.batch, *latent, generator=g), "text_emb": torch.randn(args.batch, *text, generator=g),
             "text_mask": torch.ones(args.batch, text[0], dtype=torch.int64)}
    autocast = torch.bfloat16 if device.type == "cuda" else None
    params = sum(p.numel() for p in state.model.parameters())

    def step():
        train_step(state, batch, cfg, autocast_dtype=autocast)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):  # compilation, allocator and cuDNN autotuning happen here
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name)
    out = {"arch": arch, "device": name, "params_M": round(params / 1e6, 1), "batch": args.batch,
           "step_ms": round(1e3 * seconds, 2), "samples_per_s": round(args.batch / seconds, 1),
           "GFLOP_per_step": round(flops / 1e9, 3), "TFLOPS": round(flops / seconds / 1e12, 1),
           "MFU": round(flops / seconds / (peak * 1e12), 3) if peak else None,
           "peak_mem_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
           "compile": args.compile, "gradient_checkpointing": args.gradient_checkpointing}
    print(out, flush=True)
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["unet", "dit"], choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    return [measure(arch, args) for arch in args.arch]


if __name__ == "__main__":
    main()
