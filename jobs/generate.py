"""Stage 4+5: generate images from prompts with Ray Data, then evaluate: FID against the test split,
and as configured the variational bound, prompt accuracy, guidance/sampler sweeps and report.md.

    python -m jobs.generate --config configs/tiny.yaml [generate.sampler=dpm generate.steps=20 ...]
"""

from pipeline import cli
from pipeline.eval.run import run


def main(argv=None) -> dict:
    cfg, args = cli.parse(__doc__, argv)
    cli.setup_logging()
    with cli.ray_session(args.ray_address):
        return run(cfg)


if __name__ == "__main__":
    main()
