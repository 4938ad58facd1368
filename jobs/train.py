"""Stage 3: train the latent denoiser with Ray Train (resumes when the run name already has checkpoints).

    python -m jobs.train --config configs/tiny.yaml [train.steps=400 ...]
"""

from pipeline import cli
from pipeline.train.trainer import fit


def main(argv=None) -> dict:
    cfg, args = cli.parse(__doc__, argv)
    cli.setup_logging()
    with cli.ray_session(args.ray_address):
        return fit(cfg)


if __name__ == "__main__":
    main()
