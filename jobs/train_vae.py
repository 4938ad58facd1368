"""Stage 1b: train the autoencoder (AutoencoderKL, ELBO = reconstruction + beta * KL) with Ray Train,
set its latent scaling factor from the data, report held-out PSNR and KL, export a diffusers folder.

    python -m jobs.train_vae --config configs/demo.yaml [vae_train.steps=2000 ...]
"""

from pipeline import cli
from pipeline.train.vae_job import train_vae


def main(argv=None) -> dict:
    cfg, args = cli.parse(__doc__, argv)
    cli.setup_logging()
    with cli.ray_session(args.ray_address):
        return train_vae(cfg)


if __name__ == "__main__":
    main()
