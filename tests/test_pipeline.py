"""The stages end to end on a real local Ray cluster and a real S3 server (SeaweedFS), tiny models.

One module-scoped chain (ingest -> encode -> train) is shared by the tests below; the demo test runs
the README's command in a subprocess with its own services.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from PIL import Image

from pipeline import config, paths, storage
from pipeline.data import schema
from pipeline.data.shards import build_tar
from tests.run_logs import explain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def chain(s3, ray_cluster):
    """ingest -> (a shard of bad samples added) -> encode -> train 6 steps, into a fresh prefix."""
    from pipeline.data.encode import encode
    from pipeline.data.ingest import ingest
    from pipeline.train.trainer import fit

    prefix = f"{s3.uri}/pipeline-{uuid.uuid4().hex[:8]}"
    overrides = [f"run.storage={prefix}", "vae.source=random", "data.n_train=64", "data.n_test=16", "data.shard_size=32",
                 "train.steps=6", "train.checkpoint_every=3", "train.report_every=3", "train.batch_size=8"]
    cfg = config.load(TINY, overrides)
    counts = ingest(cfg)
    bad = [
        ("bad_png", b"\x89PNG\r\n\x1a\n this is not a png", "a broken image", "png", {}),
        ("empty_caption", _png("red"), "   ", "png", {}),
        ("good_extra", _png("blue"), "a blue square", "png", {}),
    ]
    tar = build_tar(bad) + b""
    storage.write_bytes(storage.join(paths.raw(cfg), "train", "00099.tar"), tar)
    # A member with no caption at all.
    storage.write_bytes(storage.join(paths.raw(cfg), "train", "00100.tar"),
                        build_tar([("no_caption", _png("green"), None, "png", {})]))
    manifest = encode(cfg)
    train = fit(cfg)
    return {"cfg": cfg, "overrides": overrides, "counts": counts, "manifest": manifest, "train": train,
            "prefix": prefix}


def test_encode_counts_reconcile_and_rejects_are_kept(chain):
    import pyarrow.parquet as pq

    m, cfg = chain["manifest"], chain["cfg"]
    train = m["splits"]["train"]
    assert train["n_in"] == chain["counts"]["train"] + 4
    assert train["n_in"] == train["n_encoded"] + train["n_rejected"]
    assert train["n_encoded"] == chain["counts"]["train"] + 1  # good_extra made it through
    assert train["rejects_by_reason"] == {"undecodable_image": 1, "empty_caption": 1, "missing_caption": 1}
    fs, path = storage.pyarrow_fs(storage.join(paths.latents(cfg), "rejects", "train"))
    rejects = pq.read_table(path, filesystem=fs).to_pylist()
    by_key = {r["key"]: r for r in rejects}
    assert set(by_key) == {"bad_png", "empty_caption", "no_caption"}
    assert schema.reason_code(by_key["bad_png"]["reason"]) == "undecodable_image"
    assert by_key["bad_png"]["source"].endswith("00099.tar")
    assert m["untrained"] is True and m["text_encoder"]["name"] == "untrained-tiny-t5"
    assert storage.is_committed(paths.latents(cfg))
    fs, path = storage.pyarrow_fs(storage.join(paths.latents(cfg), "train"))
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == train["n_encoded"]
    latent = np.asarray(table.column("latent")[0].as_py(), dtype=np.float32)
    assert latent.size == int(np.prod(m["latent_shape"]))


def test_train_resumes_from_latest_checkpoint(chain):
    from pipeline.train.trainer import fit, latest_checkpoint_uri

    first = chain["train"]
    assert first["steps"] == 6 and first["resumed_from"] == 0 and np.isfinite(first["final_loss"])
    # Later overrides win. The resumed run shards the model over two workers (FSDP2) from the one-worker
    # DDP run's checkpoint; the checkpoints it writes are whole-tensor ones that the tests below generate from.
    cfg2 = config.load(TINY, chain["overrides"] + ["train.steps=12", "train.parallel=fsdp", "train.num_workers=2"])
    second = fit(cfg2)
    assert second["resumed_from"] == 6  # the step counter continues; nothing restarts from zero
    assert second["steps"] == 12 and np.isfinite(second["final_loss"])
    assert first["parallel"] == "ddp" and second["parallel"] == "fsdp" and second["num_workers"] == 2
    latest = latest_checkpoint_uri(cfg2)
    assert storage.read_json(storage.join(latest, "manifest.json"))["step"] == 12
    # Rank 0's own upload (manifest last) under our names, and our retention of num_to_keep.
    from pipeline.train.trainer import complete_checkpoints

    kept = complete_checkpoints(cfg2)
    assert cfg2.train.num_to_keep == 2 and [step for step, _ in kept] == [9, 12]
    assert all(os.path.basename(u.rstrip("/")).startswith(f"checkpoint_{step:08d}-") for step, u in kept)
    # Resuming under another noise schedule would continue a model trained for the old one: refused.
    cfg3 = config.load(TINY, chain["overrides"] + ["train.steps=14", "schedule.beta_schedule=scaled_linear"])
    with pytest.raises(config.ConfigError, match=r"schedule\.beta_schedule: checkpoint 'linear', config 'scaled_linear'"):
        fit(cfg3)
    assert latest_checkpoint_uri(cfg3) == latest  # nothing was trained


def test_generate_images_can_be_regenerated_alone(chain):
    from pipeline.eval.generate import Generator, image_seed
    from pipeline.train.trainer import latest_checkpoint_uri

    cfg = chain["cfg"]
    gen = Generator(cfg.to_dict(), chain["manifest"], latest_checkpoint_uri(cfg))
    seeds = [image_seed(0, i) for i in range(3)]
    batch, std = gen.images(["a cat", "a dog", "a car"], seeds, "ddim", 4, 2.0)
    alone, alone_std = gen.images(["a dog"], seeds[1:2], "ddim", 4, 2.0)
    assert batch.shape == (3, cfg.data.image_size, cfg.data.image_size, 3) and batch.dtype == np.uint8
    assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 1
    assert not np.array_equal(batch[0], batch[1])
    # Each image's latent spread comes back too (generate warns when samples are far wider than the data).
    assert std.shape == (3,) and (std > 0).all()
    assert alone_std[0] == pytest.approx(std[1], rel=1e-4)


def test_a_transformer_on_rectified_flow_trains_on_ray_and_generates(chain):
    """The same fit, checkpoints and generator for the DiT on the flow objective (same latents)."""
    from pipeline.eval.generate import Generator, image_seed
    from pipeline.train.trainer import fit, latest_checkpoint_uri

    cfg = config.load(TINY, chain["overrides"] + [
        "run.name=dit-flow", "denoiser.arch=dit", "schedule.prediction=flow", "schedule.timestep_sampling=logit_normal",
        "generate.sampler=euler", "train.steps=4", "train.checkpoint_every=2"])
    trained = fit(cfg)
    assert trained["steps"] == 4 and np.isfinite(trained["final_loss"])
    assert trained["checkpoint"].rsplit("/", 2)[-2] == "dit-flow"
    gen = Generator(cfg.to_dict(), chain["manifest"], latest_checkpoint_uri(cfg))
    assert type(gen.model).__name__ == "PixArtTransformer2DModel"
    seeds = [image_seed(0, i) for i in range(2)]
    for sampler in ("euler", "dpm"):
        images, std = gen.images(["a cat", "a dog"], seeds, sampler, 3, 2.0)
        assert images.shape == (2, cfg.data.image_size, cfg.data.image_size, 3) and np.isfinite(std).all()
    with pytest.raises(ValueError, match="'ddim' does not exist for prediction 'flow'"):
        gen.images(["a cat"], seeds[:1], "ddim", 3, 2.0)


def test_ray_job_submit_runs_a_stage(chain, ray_cluster):
    """The same job, unchanged, through the job server: generate 4 images with DPM-Solver. The entry
    point names this interpreter: `python` on PATH need not be the project's environment."""
    prefix = chain["prefix"]
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_cluster.dashboard_url,
           "--working-dir", ROOT, "--", sys.executable, "-m", "jobs.generate", "--config", "configs/tiny.yaml",
           *chain["overrides"], "generate.num_images=4", "generate.sampler=dpm", "generate.steps=5",
           "fid.enabled=false", "run.name=tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, explain(proc)
    assert "succeeded" in (proc.stdout + proc.stderr)
    info = storage.read_json(f"{prefix}/outputs/tiny/generate/generate.json")
    assert info["n"] == 4 and info["sampler"] == "dpm"
    import pyarrow.parquet as pq

    meta = pq.read_table(io.BytesIO(storage.read_bytes(f"{prefix}/outputs/tiny/generate/metadata.parquet")))
    assert meta.column_names == ["key", "prompt", "seed", "sampler", "steps", "guidance_scale"]
    assert meta.num_rows == 4


def test_generate_job_evaluates_bound_and_sweeps(chain):
    """The generate job's evaluation on tiny settings: FID, the variational bound, a guidance and a
    sampler sweep, samples for training prompts, eval.json and the report."""
    from pipeline.eval.generate import load_prompts
    from pipeline.eval.run import run as generate_job_run

    cfg = config.load(TINY, chain["overrides"] + [
        "generate.num_images=8", "generate.steps=4", "eval.vlb_latents=8", "eval.vlb_timesteps=5", "eval.seen_prompt_images=4",
        "eval.nearest_match_images=1000", "eval.sweep_images=4", "eval.sweep_guidance=[1, 2]", "eval.sweep_samplers=[ddim:3, ddim:4]", "fid.batch_size=20"])
    out = generate_job_run(cfg)
    ev = out["eval"]
    bits = ev["vlb"]["bits_per_dim"]
    assert set(bits) >= {"prior", "reconstruction", "denoising", "total"}
    assert bits["total"] == pytest.approx(bits["prior"] + bits["reconstruction"] + bits["denoising"])
    assert 0 <= bits["prior"] < 1e-3 and bits["denoising"] > 0
    rows = ev["sweeps"]
    assert [(r["sweep"], r["sampler"], r["steps"], r["guidance"]) for r in rows] == [
        ("guidance", "ddim", 4, 1.0), ("guidance", "ddim", 4, 2.0), ("sampler", "ddim", 3, 2.0), ("sampler", "ddim", 4, 2.0)]
    assert [r["nfe_per_image"] for r in rows] == [4, 8, 6, 8]
    assert all(np.isfinite(r["fid"]) and r["n"] == 4 for r in rows)
    # The configured setting (ddim:4, guidance 2) is in both sweeps: generated once, reported twice.
    assert rows[3].pop("reused") is True and "reused" not in rows[1]
    assert {k: v for k, v in rows[3].items() if k != "sweep"} == {k: v for k, v in rows[1].items() if k != "sweep"}
    assert "prompt_accuracy" not in ev  # no classifier for emoji (eval.classifier=auto)
    stored = storage.read_json(storage.join(paths.outputs(cfg), "generate", "eval.json"))
    assert stored["vlb"]["n_latents"] == 8
    # Seen prompts: training captions from the first to the last of the split, not the test prompts.
    train_captions = load_prompts(dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, prompts="train")),
                                  paths.latents(cfg))
    seen = out["seen_prompts"]
    assert seen["n"] == 4 and stored["seen_prompts"]["n"] == 4 and len(storage.ls(storage.join(seen["uri"], "images"))) == 4
    assert seen["prompts"][0] == train_captions[0] and seen["prompts"][-1] == train_captions[-1]
    assert set(seen["prompts"]) <= set(train_captions) and storage.exists(storage.join(seen["uri"], "metadata.parquet"))
    # Nearest-image check: the held-out prompts name emoji absent from train (left out, not misses);
    # the training prompts are scored against all 65 good training images (fewer than the 1,000 asked).
    near = ev["nearest_match"]
    assert near["samples"]["n"] == 0 and near["samples"]["accuracy"] is None
    assert near["seen_prompts"]["n"] == 4 and near["seen_prompts"]["n_ref"] == len(train_captions) == 65
    assert 0.0 <= near["seen_prompts"]["accuracy"] <= 1.0 and 0 < near["seen_prompts"]["chance"] < 0.1
    report = storage.read_bytes(storage.join(paths.outputs(cfg), "report", "report.md")).decode()
    assert "## Samples for training prompts" in report and "(samples_seen_prompts.png)" in report
    assert "nearest training image has the prompt, training-prompt samples" in report
    assert "Untrained encoders**: text_encoder" in report  # the tiny config's random T5 is named


def test_train_vae_through_ray_then_encode_with_it(chain):
    """The autoencoder stage on the same loop/checkpoint machinery; encode then uses its export."""
    from pipeline.data.encode import encode
    from pipeline.train.vae_job import train_vae

    cfg = config.load(TINY, chain["overrides"] + [
        "vae.source=trained", "vae_train.steps=4", "vae_train.batch_size=8", "vae_train.report_every=2",
        "vae_train.checkpoint_every=2", "vae_train.scale_images=32", "vae_train.eval_images=16"])
    info = train_vae(cfg)
    assert info["steps"] == 4 and np.isfinite(info["test_psnr"]) and info["scaling_factor"] > 0
    assert info["test_images"] == 16
    m = encode(cfg)
    assert m["vae"]["trained"] is True and m["vae"]["sha256"] == info["sha256"]
    assert paths.latents(cfg) != paths.latents(chain["cfg"])
    assert m["splits"]["train"]["n_encoded"] == chain["manifest"]["splits"]["train"]["n_encoded"]


def test_demo_end_to_end(tmp_path):
    """The README's first command on the tiny config: services up, five stages, summary, services down."""
    run_dir = tmp_path / "demo"
    env = dict(os.environ)
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS"):
        env.pop(k, None)  # the demo must bring its own services
    # Two DDP workers hold both CPUs of the 2-core CI machine: the dataset must be read before training.
    proc = subprocess.run([sys.executable, "-m", "jobs.demo", "--config", TINY, "--run-dir", str(run_dir),
                           "train.num_workers=2", "vae_train.num_workers=2"],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
    assert proc.returncode == 0, explain(proc, str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stages"]) == {"ingest", "train_vae", "encode", "train", "generate+fid"}
    assert np.isfinite(summary["vae"]["test_psnr"]) and summary["vae"]["steps"] == 10
    c = summary["counts"]
    assert c["ingested"] == 160 and c["ingested"] == c["encoded"] + c["rejected"]
    assert c["generated"] == 16
    assert summary["train"]["steps"] == 20 and np.isfinite(summary["train"]["final_loss"])
    assert summary["train"]["num_workers"] == 2
    assert np.isfinite(summary["generate"]["latent_std"]) and summary["generate"]["latent_std"] > 0
    assert summary["fid"]["n_gen"] == 16 and summary["fid"]["n_ref"] == 32
    assert np.isfinite(summary["fid"]["value"]) and summary["fid"]["value"] > 0
    report = (run_dir / "report" / "report.md").read_text()
    for png in ("samples.png", "vae_reconstructions.png", "denoiser_loss.png", "vae_loss.png"):
        assert f"({png})" in report and Image.open(run_dir / "report" / png).size[0] > 0
    assert "Seconds per stage" in report and "train_vae" in report
    grid = Image.open(run_dir / "grid.png")
    assert grid.size[0] > 4 * 16
    # Nothing left running: no process mentions the run folder any more.
    leftover = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert leftover == []
