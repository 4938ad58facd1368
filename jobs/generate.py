"""Stage 4: generate images from prompts with Ray Data, then FID against the test split.

    python -m jobs.generate --config configs/tiny.yaml [generate.sampler=dpm generate.steps=20 ...]
"""

from pipeline import cli, storage
from pipeline.data.encode import load_manifest
from pipeline.eval.evaluate import compute_fid
from pipeline.eval.sample import generate
from pipeline.train.trainer import latest_checkpoint_uri


def run(cfg) -> dict:
    manifest = load_manifest(cfg.latents_uri())
    checkpoint = latest_checkpoint_uri(cfg)
    if checkpoint is None:
        raise SystemExit(f"no complete checkpoint for run {cfg.run.name!r}: run `python -m jobs.train` first")
    out = generate(cfg, manifest, checkpoint, cfg.latents_uri())
    if cfg.fid.enabled:
        out["fid"] = compute_fid(cfg, out["images"], storage.join(cfg.outputs_uri(), "generate"))
    return out


def main(argv=None) -> dict:
    cfg, _ = cli.parse(__doc__, argv)
    cli.setup_logging()
    cli.connect_ray()
    return run(cfg)


if __name__ == "__main__":
    main()
