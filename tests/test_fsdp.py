"""train.parallel=fsdp (FSDP2) against DDP on two real gloo ranks (no Ray: the step is plain PyTorch).

One process group per model; in it, four runs on the same global batches:
  A  DDP, 4 steps, checkpoint after step 2       (the reference)
  B  FSDP, 2 steps from scratch, checkpoint      (= A's first two steps and A's step-2 checkpoint)
  C  DDP resumed from B's checkpoint, 2 steps    (= A's last two steps and A's final weights)
  D  FSDP resumed from A's checkpoint, 2 steps   (the same, the other way round)
FSDP's gradients are reduce-scattered instead of all-reduced, so sums run in another order: equal to
float32 rounding, not bit for bit.
"""

import json
import os
import socket

import pytest
import torch

from pipeline import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = {"latent_shape": [4, 8, 8], "text_shape": [16, 32]}
WORLD = 2
ARCHS = ("unet", "dit")


def _batches(steps: int, rank: int) -> list[dict]:
    """Each step's global batch of 8 rows, this rank's half of it."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        batch = {"latent": torch.randn(8, 4, 8, 8, generator=g), "text_emb": torch.randn(8, 16, 32, generator=g),
                 "text_mask": torch.ones(8, 16, dtype=torch.int64)}
        out.append({k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()})
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.train import sharding
    from pipeline.train.step import build_train_state, load_state_dict, state_dict, train_step, unwrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    null = (torch.zeros(16, 32), torch.ones(16, dtype=torch.int64))
    batches = _batches(4, rank)
    wraps = {"ddp": DistributedDataParallel, "fsdp": lambda m: sharding.shard_model(m, torch.device("cpu"))}
    result: dict = {}

    def run(arch: str, name: str, parallel: str, steps: range, resume: str | None = None, save_after: int | None = None):
        cfg = config.load(os.path.join(ROOT, "configs", "tiny.yaml"),
                          [f"denoiser.arch={arch}", f"train.parallel={parallel}", "train.warmup_steps=0"])
        state = build_train_state(cfg, MANIFEST, *null, rank=rank, wrap=wraps[parallel])
        if resume:
            load_state_dict(state, load_checkpoint(os.path.join(out_dir, arch, resume))[0])
        assert state.step == steps.start
        losses = []
        for i in steps:
            losses.append(train_step(state, batches[i], cfg)["loss"])
            if save_after == state.step:
                sd = state_dict(state)  # every rank: a collective under FSDP
                if rank == 0:
                    save_checkpoint(os.path.join(out_dir, arch, name), sd, {"step": state.step})
                dist.barrier()
        final = state_dict(state)
        local = sum(p.to_local().numel() if isinstance(p, torch.distributed.tensor.DTensor) else p.numel()
                    for p in unwrap(state.model).parameters())
        result[f"{arch}-{name}"] = {"losses": losses, "local_numel": local,
                        "total_numel": sum(v.numel() for v in final["model"].values())}
        if rank == 0:
            save_checkpoint(os.path.join(out_dir, arch, f"{name}-final"), final, {"step": state.step})
        dist.barrier()

    for arch in ARCHS:
        run(arch, "A", "ddp", range(0, 4), save_after=2)
        run(arch, "B", "fsdp", range(0, 2), save_after=2)
        run(arch, "C", "ddp", range(2, 4), resume="B")
        run(arch, "D", "fsdp", range(2, 4), resume="A")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from pipeline.checkpoint import TENSORS_FILE

    return load_file(os.path.join(folder, TENSORS_FILE))


def _assert_same_state(a: str, b: str) -> None:
    ta, tb = _tensors(a), _tensors(b)
    weights = [k for k in ta if not k.startswith("s.rng")]
    assert set(weights) == {k for k in tb if not k.startswith("s.rng")}
    assert any(".model." in k for k in weights) and any(".ema." in k for k in weights)
    assert any(".optimizer." in k for k in weights)  # the AdamW moments, whole again
    for k in weights:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_fsdp_trains_like_ddp_and_resumes_across(tmp_path):
    """Both denoisers in one pair of processes (each costs seconds of imports)."""
    import torch.multiprocessing as mp

    out = str(tmp_path)
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, start_method="spawn")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(WORLD)]
    for arch in ARCHS:
        for res in ranks:
            a, b, c, d = (res[f"{arch}-{n}"] for n in "ABCD")
            assert b["losses"] == pytest.approx(a["losses"][:2], rel=1e-5), arch
            assert c["losses"] == pytest.approx(a["losses"][2:], rel=1e-5), arch
            assert d["losses"] == pytest.approx(a["losses"][2:], rel=1e-5), arch
            # What FSDP is for, shown: each rank really holds about half of the weights; DDP all of them.
            assert a["local_numel"] == a["total_numel"] == c["local_numel"], arch
            assert b["local_numel"] == d["local_numel"] and b["local_numel"] <= a["total_numel"] * 0.55, arch
        assert ranks[0][f"{arch}-A"]["losses"] != ranks[1][f"{arch}-A"]["losses"]  # each rank has its own half
        _assert_same_state(f"{out}/{arch}/B", f"{out}/{arch}/A")  # FSDP's step-2 checkpoint is DDP's
        _assert_same_state(f"{out}/{arch}/C-final", f"{out}/{arch}/A-final")  # resumed across, both ways
        _assert_same_state(f"{out}/{arch}/D-final", f"{out}/{arch}/A-final")
