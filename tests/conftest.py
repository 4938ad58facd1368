"""Shared test fixtures: a private S3 server and a local Ray head, started only if a test asks.

Both are session-scoped (a Ray head costs seconds to start and to stop) and lazy: tests that request
neither start nothing. They run on 127.0.0.1 with freely picked ports, so test sessions can run side
by side on one machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# No model hub is reachable: fail fast (about 1.5 s) instead of hanging (about 47 s) on a hub id.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Read by ray at import: keeps drivers (ray.init in this process) on 127.0.0.1 like the head.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # the project need not be pip-installed to be tested
    sys.path.insert(0, _REPO)

from pipeline.dev.ray_head import LocalRay  # noqa: E402
from pipeline.dev.s3 import SeaweedS3  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server with bucket `rld-test`, its AWS_* variables set for the whole session.

    Attributes: `uri` ("s3://rld-test"), `endpoint`, `bucket`, `env`, `client()` (an s3fs filesystem
    with explicit credentials). Objects persist across tests: use a unique prefix per test.
    """
    server = SeaweedS3(str(tmp_path_factory.mktemp("s3-run")), bucket="rld-test")
    with server:
        server.apply_env()  # undone by stop()
        yield server


@pytest.fixture(scope="session")
def ray_cluster(s3: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRay]:
    """A local Ray head (2 CPUs, dashboard + job server) with this process connected via ray.init().

    Depends on `s3` on purpose: Ray workers inherit the head's environment, so the head is started
    with the S3 variables and every task, Train worker and submitted job can reach the bucket.
    Attributes: `address` (for ray.init), `dashboard_url` (for `ray job submit --address`).
    """
    import ray

    head = LocalRay(str(tmp_path_factory.mktemp("ray-run")), num_cpus=2, env=s3.env)
    with head:
        head.connect()
        try:
            yield head
        finally:
            ray.shutdown()


#: Run last. After an in-process TorchTrainer.fit(), test_a_ray_head_alone_is_guarded_too (another Ray
#: head started and SIGKILLed on the machine) left this process's Ray driver unable to reach the GCS:
#: its next call waited forever (README, known gaps). The file disconnects that driver first, and
#: nothing after it needs one.
LAST_FILES = ("tests/faults/test_processes.py",)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Move the tests of LAST_FILES to the end, keeping every other order."""
    is_last = [item.nodeid.startswith(LAST_FILES) for item in items]
    items[:] = [i for i, last in zip(items, is_last) if not last] + [i for i, last in zip(items, is_last) if last]
