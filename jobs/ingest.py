"""Stage 1: write a built-in dataset to object storage in img2dataset's layout.

    python -m jobs.ingest --config configs/tiny.yaml [section.key=value ...]
"""

from pipeline import cli
from pipeline.data.ingest import ingest


def main(argv=None) -> dict:
    cfg, _ = cli.parse(__doc__, argv)
    cli.setup_logging()
    cli.prepare_storage(cfg)
    return ingest(cfg)


if __name__ == "__main__":
    main()
