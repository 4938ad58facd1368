"""Stage 2: stream the raw shards through Ray Data, encode captions (T5) and images (VAE) to latents.

    python -m jobs.encode --config configs/tiny.yaml [section.key=value ...]
"""

from pipeline import cli, paths
from pipeline.data.encode import encode


def main(argv=None) -> dict:
    cfg, args = cli.parse(__doc__, argv)
    cli.setup_logging()
    with cli.ray_session(args.ray_address):
        manifest = encode(cfg)
    print(f"encode: {manifest['n_encoded']} encoded, {manifest['n_rejected']} rejected -> {paths.latents(cfg)}")
    return manifest


if __name__ == "__main__":
    main()
