"""Files from storage that lie or attack: pickles that would run code, checkpoints whose bytes changed,
non-finite numbers. Each test first shows the fault is real, then that nothing trusts it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipeline import config, storage
from pipeline import checkpoint_store
from pipeline.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    TENSORS_FILE,
    IncompleteCheckpoint,
    NonFiniteCheckpoint,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST = {"latent_shape": [4, 8, 8], "text_shape": [16, 32]}
NULL = (torch.zeros(16, 32), torch.ones(16, dtype=torch.int64))


def _cfg(*overrides):
    return config.load(os.path.join(ROOT, "configs", "tiny.yaml"), list(overrides))


class _WritesMarker:
    """Unpickling this creates a folder: the stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _hostile_old_format(folder, marker: str) -> None:
    """What the previous version wrote (state.pt + a manifest of sizes), with a payload inside."""
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": _WritesMarker(marker), "step": 99}, os.path.join(folder, "state.pt"))
    with open(os.path.join(folder, MANIFEST_FILE), "w") as f:
        json.dump({"files": {"state.pt": os.path.getsize(os.path.join(folder, "state.pt"))}, "step": 99}, f)


def test_a_crafted_pickle_never_runs(tmp_path, s3):
    """A checkpoint in storage with a valid (old-format) manifest and a pickle that would create a
    folder: unpickling it really does (the fault), but no load path of ours touches it."""
    marker = str(tmp_path / "pwned")
    local = tmp_path / "crafted"
    _hostile_old_format(local, marker)
    torch.load(local / "state.pt", weights_only=False)  # what the old code did
    assert os.path.isdir(marker)  # the payload is live
    os.rmdir(marker)

    run_uri = f"{s3.uri}/hostile-{os.getpid()}/checkpoints/tiny"
    for name in ("state.pt", MANIFEST_FILE):
        storage.upload_file(str(local / name), f"{run_uri}/checkpoint_00000099/{name}")
    # A second folder in the current format whose safetensors bytes ARE the pickle, hashes matching.
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / TENSORS_FILE).write_bytes((local / "state.pt").read_bytes())
    (forged / STATE_FILE).write_text(json.dumps({"model": {"__tensor__": "s.model"}, "step": 100}))
    files = {n: {"size": os.path.getsize(forged / n), "sha256": sha256_file(forged / n)} for n in (TENSORS_FILE, STATE_FILE)}
    (forged / MANIFEST_FILE).write_text(json.dumps({"format": "rld-checkpoint-2", "files": files, "step": 100}))
    for name in (TENSORS_FILE, STATE_FILE, MANIFEST_FILE):
        storage.upload_file(str(forged / name), f"{run_uri}/checkpoint_00000100/{name}")

    with pytest.raises(IncompleteCheckpoint, match="pickled checkpoints"):
        load_checkpoint(str(local))
    with pytest.raises(IncompleteCheckpoint, match="do not parse"):
        load_checkpoint(str(forged))
    assert [s for s, _ in checkpoint_store.candidates(run_uri)] == [100]  # the old format is not even listed
    assert checkpoint_store.load_newest_trusted(run_uri) is None  # what training and generate call
    from pipeline.models.denoiser import load_ema_denoiser

    with pytest.raises(IncompleteCheckpoint):  # the generator actor's loader, pointed at it directly
        load_ema_denoiser(_cfg(), MANIFEST, f"{run_uri}/checkpoint_00000099")
    assert not os.path.exists(marker)


def test_upload_writes_the_manifest_last_and_unfinished_uploads_are_removed(tmp_path, s3, monkeypatch):
    """Ray Train's upload goes through checkpoint_store.upload_checkpoint: files, then the manifest. A
    folder whose manifest never arrived is not listed, and `fit` removes it (remove_incomplete)."""
    save_checkpoint(str(tmp_path / "c"), {"w": torch.arange(1000.0), "step": 7}, {"step": 7})
    order = []
    real = storage.upload_file

    def recording(local, uri):
        order.append(os.path.basename(local))
        real(local, uri)

    monkeypatch.setattr(storage, "upload_file", recording)
    run_uri = f"{s3.uri}/upload-{os.getpid()}/tiny"
    checkpoint_store.upload_checkpoint(str(tmp_path / "c"), f"{run_uri}/checkpoint_00000007")
    assert order[-1] == MANIFEST_FILE and set(order) == {TENSORS_FILE, STATE_FILE, MANIFEST_FILE}
    assert checkpoint_store.candidates(run_uri) == [(7, f"{run_uri}/checkpoint_00000007")]
    # A crash between the files and the manifest:
    order.clear()
    monkeypatch.setattr(storage, "upload_file", lambda local, uri: None if local.endswith(MANIFEST_FILE) else real(local, uri))
    checkpoint_store.upload_checkpoint(str(tmp_path / "c"), f"{run_uri}/checkpoint_00000008")
    assert storage.exists(f"{run_uri}/checkpoint_00000008/{TENSORS_FILE}")  # the partial folder is there
    assert [s for s, _ in checkpoint_store.candidates(run_uri)] == [7]
    assert checkpoint_store.remove_incomplete(run_uri) == [f"{run_uri}/checkpoint_00000008"]
    assert storage.ls(f"{run_uri}/checkpoint_00000008") == []  # (SeaweedFS may keep listing the empty folder)
    assert checkpoint_store.remove_incomplete(run_uri) == []
    folder, state, _ = checkpoint_store.load_newest_trusted(run_uri)
    assert folder.endswith("checkpoint_00000007") and torch.equal(state["w"], torch.arange(1000.0))


def test_non_finite_tensors_never_reach_a_checkpoint(tmp_path):
    with pytest.raises(NonFiniteCheckpoint):
        save_checkpoint(str(tmp_path / "c"), {"w": torch.tensor([1.0, float("nan")])}, {"step": 1})
    assert not os.path.exists(tmp_path / "c" / MANIFEST_FILE)


def _batches(n, nan_at=(), bs=8):
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        latent = torch.randn(bs, 4, 8, 8, generator=g)
        if i in nan_at:
            latent[0, 0, 0, 0] = float("nan")
        out.append({"latent": latent, "text_emb": torch.randn(bs, 16, 32, generator=g),
                    "text_mask": torch.ones(bs, 16, dtype=torch.int64)})
    return out


def test_a_non_finite_step_is_skipped_counted_and_reported(tmp_path):
    from pipeline.train.loop import run_loop
    from pipeline.train.step import build_train_state, state_dict, train_step

    cfg = _cfg("train.steps=6", "train.report_every=2", "train.checkpoint_every=6", "train.batch_size=8")
    state = build_train_state(cfg, MANIFEST, *NULL)
    batches = _batches(8, nan_at={2, 5})
    out = train_step(build_train_state(cfg, MANIFEST, *NULL), batches[2], cfg)
    assert not np.isfinite(out["loss"]) and out["applied"] is False  # the fault is real
    reports = []

    def report(metrics, ckpt):
        reports.append(metrics)
        if ckpt is not None:
            save_checkpoint(str(tmp_path / "c"), state_dict(ckpt), {"step": ckpt.step})

    run_loop(cfg, state, lambda epoch: batches, report)
    assert state.step == 6 and state.nonfinite_skipped == 2 and state.batch_in_epoch == 8
    assert [m["step"] for m in reports] == [2, 4, 6] and reports[-1]["nonfinite_skipped"] == 2
    assert all(np.isfinite(m["loss"]) for m in reports)
    sd, _ = load_checkpoint(str(tmp_path / "c"))  # written: every tensor finite
    assert sd["nonfinite_skipped"] == 2


def test_consecutive_non_finite_steps_stop_the_run():
    from pipeline.train.loop import NonFiniteTraining, run_loop
    from pipeline.train.step import build_train_state

    cfg = _cfg("train.steps=6", "train.report_every=2", "train.checkpoint_every=6", "train.batch_size=8",
               "train.max_nonfinite_steps=3", "train.warmup_steps=0")
    state = build_train_state(cfg, MANIFEST, *NULL)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    batches = _batches(8, nan_at={1, 2, 3})
    reports = []
    with pytest.raises(NonFiniteTraining, match="3 consecutive.*max_nonfinite_steps=3"):
        run_loop(cfg, state, lambda epoch: batches, lambda m, c: reports.append(m))
    assert state.step == 1 and state.nonfinite_skipped == 3
    assert all(bool(torch.isfinite(v).all()) for v in state.model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())  # step 1 applied


def test_non_finite_latents_are_rejected():
    """A VAE that outputs NaN (its weights poisoned: the fault) gives nonfinite_latent reasons, as does
    a text embedding that overflows float16; finite rows pass."""
    from pipeline.data.encode import EncodeLatents, nonfinite_reasons

    lat = np.zeros((3, 4, 2, 2), np.float32)
    lat[1, 0, 0, 0] = np.inf
    emb = np.zeros((3, 5, 8), np.float32)
    emb[2, 0, 0] = 1e6
    reasons = nonfinite_reasons(lat, emb.astype(np.float16))
    assert reasons[0] == "" and reasons[1].startswith("nonfinite_latent") and reasons[2].startswith("nonfinite_latent")

    enc = EncodeLatents(_cfg("vae.source=random").to_dict())
    batch = {"key": np.array(["a", "b"]), "source": np.array(["s", "s"]), "caption": np.array(["x", "y"]),
             "image": np.full((2, 32, 32, 3), 128, np.uint8)}
    assert enc(batch)["reason"] == ["", ""]
    with torch.no_grad():
        enc.vae.encoder.conv_in.weight.fill_(float("nan"))
    out = enc(batch)
    assert not np.isfinite(out["latent"]).all()
    assert [r.split(":")[0] for r in out["reason"]] == ["nonfinite_latent"] * 2


def test_latent_files_must_match_the_commit_marker(tmp_path):
    """Training reads exactly the parquet files `_COMMITTED` lists: one lost, truncated or added since
    is refused with the folder named (here on a hand-built latents folder)."""
    from pipeline.data.latents import committed_files

    root = tmp_path / "latents"
    (root / "train").mkdir(parents=True)
    for name in ("a.parquet", "b.parquet"):
        (root / "train" / name).write_bytes(b"x" * 100)
    storage.write_commit_marker(str(root), {"files": {"train": {"a.parquet": 100, "b.parquet": 100}}})
    assert [os.path.basename(f) for f in committed_files(str(root), "train")] == ["a.parquet", "b.parquet"]
    (root / "train" / "stray.parquet").write_bytes(b"y")  # added by someone else
    with pytest.raises(storage.CorruptArtifact, match="stray.parquet"):
        committed_files(str(root), "train")
    os.remove(root / "train" / "stray.parquet")
    with open(root / "train" / "b.parquet", "r+b") as f:
        f.truncate(50)
    with pytest.raises(storage.CorruptArtifact, match="b.parquet"):
        committed_files(str(root), "train")
    storage.write_commit_marker(str(root), {})  # an older version's marker
    with pytest.raises(storage.CorruptArtifact, match="older version"):
        committed_files(str(root), "train")


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped():
    """The loss is finite but a gradient is not (a hook poisons it: the fault): no update is applied."""
    from pipeline.train.step import apply_update, build_train_state

    cfg = _cfg("train.warmup_steps=0")
    state = build_train_state(cfg, MANIFEST, *NULL)
    param = next(state.model.parameters())
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    handle = param.register_hook(lambda g: g * float("inf"))
    loss = sum(p.float().pow(2).mean() for p in state.model.parameters())
    assert torch.isfinite(loss)
    grad_norm, applied = apply_update(state, loss, grad_clip=1.0)
    handle.remove()
    assert not np.isfinite(grad_norm) and applied is False
    assert state.step == 0 and state.nonfinite_skipped == 1
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    loss = sum(p.float().pow(2).mean() for p in state.model.parameters())
    _, applied = apply_update(state, loss, grad_clip=1.0)
    assert applied and state.step == 1


def _vote_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.train.step import TrainState, apply_update

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(model=model, ema=None, optimizer=opt, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                       generator=torch.Generator(), seed=0, rank=rank)
    loss = model(torch.ones(4, 3)).pow(2).mean()
    if rank == 1:
        loss = loss + torch.tensor(float("inf"))  # this rank's loss is inf, its gradient is not
    _, applied = apply_update(state, loss, grad_clip=1.0)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump({"applied": applied, "weight": model.module.weight.detach().tolist()}, f)
    dist.destroy_process_group()
    # Exit without running destructors: torch 2.13's DDP Reducer, freed with the GIL held, can join a
    # gloo thread that waits for the GIL (seen hanging this test for 12 minutes). The result is on disk.
    os._exit(0)


def test_ddp_ranks_agree_to_skip(tmp_path):
    """Rank 1's loss is inf while the all-reduced gradient is finite: without the vote rank 0 would
    step and rank 1 would not, and the replicas would drift apart. Both skip."""
    import torch.multiprocessing as mp

    mp.spawn(_vote_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["applied"] is False and r1["applied"] is False
    assert r0["weight"] == r1["weight"]
