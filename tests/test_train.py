"""The training step and loop without Ray: the objective, exact resume, and never trusting a partial checkpoint."""

import os

import pytest
import torch

from pipeline import config
from pipeline.checkpoint import TENSORS_FILE, IncompleteCheckpoint, load_checkpoint
from pipeline.train.loop import latest_local_checkpoint, train_locally
from pipeline.train.step import build_train_state, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = {"latent_shape": [4, 8, 8], "text_shape": [16, 32]}


def _cfg(*overrides):
    return config.load(os.path.join(ROOT, "configs", "tiny.yaml"),
                       ["train.report_every=2", "train.checkpoint_every=4", *overrides])


def _data(n=48):
    g = torch.Generator().manual_seed(123)
    return {
        "latent": torch.randn(n, 4, 8, 8, generator=g),
        "text_emb": torch.randn(n, 16, 32, generator=g),
        "text_mask": torch.ones(n, 16, dtype=torch.int64),
    }


NULL = (torch.zeros(16, 32), torch.ones(16, dtype=torch.int64))


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and not slower for these tiny models
    yield
    torch.set_num_threads(n)


RECIPES = {
    "unet-epsilon": [],
    "dit-v-min_snr-offset": ["denoiser.arch=dit", "schedule.prediction=v", "train.loss_weighting=min_snr",
                             "train.noise_offset=0.1"],
    "dit-flow-logit_normal": ["denoiser.arch=dit", "schedule.prediction=flow", "schedule.timestep_sampling=logit_normal",
                              "schedule.shift=3.0", "generate.sampler=euler", "eval.vlb_latents=0"],
    "unet-x0-zero_snr": ["schedule.prediction=x0", "schedule.zero_terminal_snr=true"],
}


def test_step_minimises_noise_prediction_error():
    """Repeated steps on one batch drive ||eps - eps_theta(x_t, t)||^2 down (the DDPM objective)."""
    cfg = _cfg("train.lr=2e-3", "train.warmup_steps=0", "train.cond_dropout=0.0")
    state = build_train_state(cfg, MANIFEST, *NULL)
    batch = {k: v[:16] for k, v in _data().items()}
    first = [train_step(state, batch, cfg)["loss"] for _ in range(3)]
    for _ in range(40):
        last = train_step(state, batch, cfg)["loss"]
    assert state.step == 43
    assert first[0] > 0.8  # an untrained UNet predicts noise badly: loss ~ Var(eps) = 1
    assert last < 0.7 * first[0]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "unet-epsilon"])
def test_every_recipe_learns_its_target(recipe):
    """The same loop on the transformer and on the other objectives: a fixed batch's loss (at fixed noise
    levels and noise: the step seed is pinned) falls, so the prediction is learning its target."""
    cfg = _cfg("train.lr=2e-3", "train.warmup_steps=0", "train.cond_dropout=0.0", *RECIPES[recipe])
    state = build_train_state(cfg, MANIFEST, *NULL)
    assert (type(state.model).__name__ == "PixArtTransformer2DModel") == ("dit" in recipe)
    batch = {k: v[:16] for k, v in _data().items()}

    def loss_at_step_zero():
        step = state.step
        state.step = 0  # the same t and noise draws every time
        with torch.no_grad():
            out = _fixed_draw_loss(state, batch, cfg)
        state.step = step
        return out

    before = loss_at_step_zero()
    for _ in range(40):
        train_step(state, batch, cfg)
    assert loss_at_step_zero() < 0.8 * before  # measured: 1.34 -> 1.01, 2.34 -> 1.53, 1.15 -> 0.79


def _fixed_draw_loss(state, batch, cfg):
    """The loss train_step would compute at the state's step, without updating anything."""
    from pipeline import diffusion
    from pipeline.models.denoiser import predict
    from pipeline.train.step import step_seed

    obj = state.objective
    g = torch.Generator().manual_seed(step_seed(state.seed, state.rank, state.step))
    x0 = batch["latent"].float()
    torch.rand(x0.shape[0], generator=g)  # the caption-dropout draw
    noise = torch.randn(x0.shape, generator=g)
    level = diffusion.draw_noise_levels(cfg.schedule, x0.shape[0], g)
    x_t = diffusion.noisy_input(cfg.schedule, obj.noise_scheduler, x0, noise, level)
    want = diffusion.target(cfg.schedule, obj.noise_scheduler, x0, noise, level)
    pred = predict(state.model, x_t, diffusion.model_time(cfg.schedule, level), batch["text_emb"], batch["text_mask"])
    return float(((pred - want) ** 2).mean())


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_is_exact(tmp_path, recipe):
    """8 steps straight == 4 steps, stop, resume to 8: same weights, EMA, optimizer and data order
    (for the UNet and the transformer, on every objective)."""
    data = _data()
    extra = RECIPES[recipe]
    straight = train_locally(_cfg("train.steps=8", *extra), MANIFEST, *NULL, data, str(tmp_path / "a"))
    first = train_locally(_cfg("train.steps=4", *extra), MANIFEST, *NULL, data, str(tmp_path / "b"))
    resumed = train_locally(_cfg("train.steps=8", *extra), MANIFEST, *NULL, data, str(tmp_path / "b"))
    assert [m["step"] for m in first] == [2, 4]
    assert [m["step"] for m in resumed] == [6, 8]  # continues; nothing restarts from zero
    assert [m["loss"] for m in straight] == [m["loss"] for m in first + resumed]
    a, _ = load_checkpoint(str(tmp_path / "a" / "checkpoint_00000008"))
    b, _ = load_checkpoint(str(tmp_path / "b" / "checkpoint_00000008"))
    for part in ("model",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    assert (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"])


def test_partial_checkpoint_is_never_trusted(tmp_path):
    train_locally(_cfg("train.steps=4"), MANIFEST, *NULL, _data(), str(tmp_path))
    good = latest_local_checkpoint(str(tmp_path))
    assert good.endswith("checkpoint_00000004")
    # A crash while writing step 8: the tensors half-written, manifest never written.
    broken = tmp_path / "checkpoint_00000008"
    broken.mkdir()
    (broken / TENSORS_FILE).write_bytes(b"\x80partial")
    with pytest.raises(IncompleteCheckpoint, match="never completed"):
        load_checkpoint(str(broken))
    assert latest_local_checkpoint(str(tmp_path)) == good
    # Truncation after the manifest was written (e.g. a bad copy) is caught by the size check.
    with open(os.path.join(good, TENSORS_FILE), "r+b") as f:
        f.truncate(100)
    with pytest.raises(IncompleteCheckpoint, match="truncated"):
        load_checkpoint(good)


def _flip_middle(path, n=256):
    """Invert n bytes in the middle of a file, keeping its size."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(n)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert os.path.getsize(path) == size


@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_corrupt_newest_checkpoint_falls_back_to_the_intact_older_one(tmp_path, fault):
    """A committed checkpoint whose bytes changed (256 bytes flipped at equal size, or truncated) is
    refused by its sha256/size, reported, and training resumes from the older intact one: the run
    still ends bit-identical to an uninterrupted one."""
    data = _data()
    straight = train_locally(_cfg("train.steps=12"), MANIFEST, *NULL, data, str(tmp_path / "a"))
    out = tmp_path / "b"
    train_locally(_cfg("train.steps=8"), MANIFEST, *NULL, data, str(out))
    newest = out / "checkpoint_00000008" / TENSORS_FILE
    before = newest.read_bytes()
    if fault == "flip":
        _flip_middle(newest)
    else:
        with open(newest, "r+b") as f:
            f.truncate(len(before) // 2)
    assert newest.read_bytes() != before  # the fault is real
    with pytest.raises(IncompleteCheckpoint, match="sha256" if fault == "flip" else "truncated"):
        load_checkpoint(str(newest.parent))
    assert latest_local_checkpoint(str(out)).endswith("checkpoint_00000004")
    resumed = train_locally(_cfg("train.steps=12"), MANIFEST, *NULL, data, str(out))
    assert [m["step"] for m in resumed] == [6, 8, 10, 12]  # from step 4, not 8 and not 0
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[2:]]
    a, _ = load_checkpoint(str(tmp_path / "a" / "checkpoint_00000012"))
    b, _ = load_checkpoint(str(out / "checkpoint_00000012"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    """Nothing pickled: the folder holds exactly the safetensors file, the JSON state and the manifest
    (with each file's size and sha256), and the JSON state round-trips the optimizer and RNG."""
    import json

    from pipeline.checkpoint import MANIFEST_FILE, STATE_FILE, sha256_file

    train_locally(_cfg("train.steps=4"), MANIFEST, *NULL, _data(), str(tmp_path))
    folder = tmp_path / "checkpoint_00000004"
    assert sorted(os.listdir(folder)) == sorted([TENSORS_FILE, STATE_FILE, MANIFEST_FILE])
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for name in (TENSORS_FILE, STATE_FILE):
        assert manifest["files"][name] == {"size": os.path.getsize(folder / name), "sha256": sha256_file(folder / name)}
    json.loads((folder / STATE_FILE).read_text())  # plain JSON
    state, _ = load_checkpoint(str(folder))
    assert state["step"] == 4 and isinstance(state["optimizer"]["state"], dict)
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])  # int keys survive JSON
    assert isinstance(state["rng"]["python"], tuple) and state["rng"]["numpy"][0] == "MT19937"
    assert state["rng"]["torch"].dtype == torch.uint8


def test_caption_dropout_uses_the_empty_caption():
    """With cond_dropout=1 every caption is replaced: the text embedding no longer matters."""
    cfg = _cfg("train.cond_dropout=0.9999")
    batch = {k: v[:8] for k, v in _data().items()}
    other = dict(batch, text_emb=torch.randn_like(batch["text_emb"]))
    l1 = train_step(build_train_state(cfg, MANIFEST, *NULL), batch, cfg)["loss"]
    l2 = train_step(build_train_state(cfg, MANIFEST, *NULL), other, cfg)["loss"]
    assert l1 == pytest.approx(l2, abs=0)
    cfg0 = _cfg("train.cond_dropout=0.0")
    l3 = train_step(build_train_state(cfg0, MANIFEST, *NULL), batch, cfg0)["loss"]
    l4 = train_step(build_train_state(cfg0, MANIFEST, *NULL), other, cfg0)["loss"]
    assert l3 != l4


def test_storage_checkpoint_listing_skips_unfinished_ones(tmp_path):
    """What `fit` resumes and `generate`/bench/fid_curve.py read: only checkpoints whose manifest
    exists and whose files have the sizes it records, ordered by the manifest's step; the newest that
    also passes its sha256 is the one used. Folders not named by us are neither listed nor removed."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.checkpoint_store import remove_incomplete
    from pipeline.train.trainer import complete_checkpoints, latest_checkpoint_uri

    cfg = _cfg(f"run.storage={tmp_path}")
    run_dir = tmp_path / "checkpoints" / cfg.run.name
    assert latest_checkpoint_uri(cfg) is None
    for name, step in (("00000004-bbbbbbbb", 4), ("00000008-aaaaaaaa", 8), ("00000012-cccccccc", 12),
                       ("00000016-eeeeeeee", 16), ("2026-11-30_10-00-00.000000", 20)):
        save_checkpoint(str(run_dir / f"checkpoint_{name}"), {"w": torch.full((300,), float(step))}, {"step": step})
    with open(run_dir / "checkpoint_00000012-cccccccc" / TENSORS_FILE, "r+b") as f:
        f.truncate(10)  # a bad copy after the manifest
    _flip_middle(run_dir / "checkpoint_00000016-eeeeeeee" / TENSORS_FILE, n=16)  # bit rot at equal size
    (run_dir / "checkpoint_00000024-dddddddd").mkdir()  # a crash before the manifest
    (run_dir / "checkpoint_00000024-dddddddd" / TENSORS_FILE).write_bytes(b"\x80partial")
    found = complete_checkpoints(cfg)
    assert [(step, os.path.basename(uri.rstrip("/"))) for step, uri in found] == [
        (4, "checkpoint_00000004-bbbbbbbb"), (8, "checkpoint_00000008-aaaaaaaa"), (16, "checkpoint_00000016-eeeeeeee")]
    assert os.path.basename(latest_checkpoint_uri(cfg)) == "checkpoint_00000008-aaaaaaaa"  # 16 fails its sha256
    assert [os.path.basename(u) for u in remove_incomplete(str(run_dir))] == ["checkpoint_00000024-dddddddd"]
    assert sorted(os.listdir(run_dir)) == [
        "checkpoint_00000004-bbbbbbbb", "checkpoint_00000008-aaaaaaaa", "checkpoint_00000012-cccccccc",
        "checkpoint_00000016-eeeeeeee", "checkpoint_2026-11-30_10-00-00.000000"]


@pytest.mark.parametrize("manifest", [
    [], {"format": "rld-checkpoint-2"}, {"format": "rld-checkpoint-2", "step": 9, "files": {"tensors.safetensors": 5}},
    {"format": "rld-checkpoint-2", "files": {"tensors.safetensors": {"size": 1, "sha256": "x"},
                                             "state.json": {"size": 1, "sha256": "x"}}},
], ids=["list", "no-files", "sizes-only", "no-step"])
def test_a_malformed_manifest_is_one_more_untrusted_folder(tmp_path, manifest):
    """A manifest of the wrong shape is refused like a corrupt file (listed as not trusted, older ones
    used), never a crash of the listing that training and generate share."""
    import json

    from pipeline.checkpoint import MANIFEST_FILE, save_checkpoint
    from pipeline.checkpoint_store import candidates, load_newest_trusted

    save_checkpoint(str(tmp_path / "checkpoint_00000004"), {"w": torch.ones(3)}, {"step": 4})
    save_checkpoint(str(tmp_path / "checkpoint_00000009"), {"w": torch.zeros(3)}, {"step": 9})
    (tmp_path / "checkpoint_00000009" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IncompleteCheckpoint):
        load_checkpoint(str(tmp_path / "checkpoint_00000009"))
    assert [s for s, _ in candidates(str(tmp_path))] == [4]
    folder, state, _ = load_newest_trusted(str(tmp_path))
    assert folder.endswith("checkpoint_00000004") and torch.equal(state["w"], torch.ones(3))


def test_retention_keeps_the_newest_and_never_the_one_just_written(tmp_path):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.checkpoint_store import candidates, save_to_storage

    for step in (2, 4, 6):
        save_checkpoint(str(tmp_path / "local"), {"w": torch.full((3,), float(step))}, {"step": step})
        save_to_storage(str(tmp_path / "local"), str(tmp_path / "run"), step, num_to_keep=2)
    assert [s for s, _ in candidates(str(tmp_path / "run"))] == [4, 6]
    # A resumed run reaching step 4 again writes a new folder beside the old one, not over it.
    save_checkpoint(str(tmp_path / "local"), {"w": torch.full((3,), 44.0)}, {"step": 4})
    again = save_to_storage(str(tmp_path / "local"), str(tmp_path / "run"), 4, num_to_keep=2)
    steps = candidates(str(tmp_path / "run"))
    assert [s for s, _ in steps] == [4, 6] and steps[0][1] == again  # the older step-4 folder was pruned


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_gradient_checkpointing_changes_memory_not_results(arch):
    """train.gradient_checkpointing recomputes activations in the backward pass: the same loss and the
    same updated weights as without, step for step."""
    batch = {k: v[:8] for k, v in _data().items()}
    states = []
    for ckpt in ("false", "true"):
        cfg = _cfg(f"denoiser.arch={arch}", f"train.gradient_checkpointing={ckpt}", "train.warmup_steps=0")
        state = build_train_state(cfg, MANIFEST, *NULL)
        losses = [train_step(state, batch, cfg)["loss"] for _ in range(2)]
        states.append((state, losses))
    (plain, plain_losses), (ckpt, ckpt_losses) = states
    assert ckpt.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    assert plain_losses == pytest.approx(ckpt_losses, rel=1e-6, abs=1e-7)
    for a, b in zip(plain.model.parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gpu_step_bench_runs_without_ray():
    """bench/gpu_step.py must run where only torch, diffusers and transformers are installed: here on
    the CPU with the tiny transformer, in a fresh interpreter that never imports Ray or s3fs."""
    import json
    import subprocess
    import sys

    script = ("import json, sys; sys.path.insert(0, 'bench'); import gpu_step; "
              "out = gpu_step.main(['--device', 'cpu', '--arch', 'tiny', '--batch', '4', '--steps', '2', '--warmup', '1']); "
              "print('RESULT', json.dumps(out)); print('MODULES', json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
             if line.startswith(("RESULT ", "MODULES "))}
    (result,) = lines["RESULT"]
    assert result["arch"] == "tiny" and result["GFLOP_per_step"] > 0 and result["step_ms"] > 0 and result["MFU"] is None
    assert "ray" not in lines["MODULES"] and "s3fs" not in lines["MODULES"]
