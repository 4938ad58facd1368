"""cluster.yaml passes Ray's own cluster-launcher validation and describes the cluster we mean.

`ray up` runs prepare_config (merge with the AWS defaults) and validate_config (the JSON schema in
ray/autoscaler/ray-schema.json plus cross-field checks) before it touches AWS; we run the same two
steps offline. The broken-config cases prove the validator actually rejects mistakes.
"""

from __future__ import annotations

import copy
import os
import shlex

import jsonschema
import pytest
import yaml

import ray
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")


@pytest.fixture(scope="module")
def raw_config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def config(raw_config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(raw_config))
    validate_config(prepared)
    return prepared


def _gpu_worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {
        name: t
        for name, t in config["available_node_types"].items()
        if name != head and t["node_config"].get("InstanceType", "").startswith(("g", "p"))
    }


def test_raw_file_is_valid_too(raw_config: dict) -> None:
    validate_config(raw_config)  # no reliance on defaults filling required fields


def test_aws_head_and_autoscaling_gpu_workers(config: dict) -> None:
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]
    head = config["available_node_types"][config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "head should be a CPU node"
    assert head["max_workers"] == 0

    gpu = _gpu_worker_types(config)
    assert gpu, "no GPU worker node type"
    for name, t in gpu.items():
        assert t["min_workers"] == 0, f"{name}: should scale from zero"
        assert t["max_workers"] >= 1, f"{name}: can never launch"
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu.values())


def test_images_match_installed_ray(config: dict) -> None:
    docker = config["docker"]
    for key in ("head_image", "worker_image"):
        tag = docker[key].rsplit(":", 1)[1]
        assert tag.startswith(ray.__version__ + "-"), f"{key} {docker[key]} is not Ray {ray.__version__}"
    assert docker["worker_image"].endswith("-gpu")


def test_project_is_mounted_and_installed_on_every_node(config: dict) -> None:
    mounts = config["file_mounts"]
    repo_mounts = [r for r, l in mounts.items() if os.path.abspath(os.path.join(REPO, l)) == REPO]
    assert repo_mounts, f"the repository is not in file_mounts: {mounts}"
    remote = repo_mounts[0]
    assert os.path.exists(os.path.join(REPO, "pyproject.toml"))

    def installs_project(cmds: list[str]) -> bool:
        for cmd in cmds:
            words = shlex.split(cmd)
            if "pip" in words and "install" in words and remote in words:
                return True
        return False

    # prepare_config merges setup_commands into both lists: check what each node really runs.
    assert installs_project(config["head_setup_commands"])
    assert installs_project(config["worker_setup_commands"])


def test_start_commands(config: dict) -> None:
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker


def _drop(key: str):
    def mutate(c: dict) -> None:
        del c[key]

    return mutate


def _set(path: tuple[str, ...], value):
    def mutate(c: dict) -> None:
        d = c
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, error",
    [
        (_drop("cluster_name"), jsonschema.ValidationError),  # required key
        (_set(("bogus_key",), 1), jsonschema.ValidationError),  # unknown top-level key
        (_set(("available_node_types", "ray.worker.gpu", "max_worker"), 4), jsonschema.ValidationError),  # typo
        (_set(("available_node_types", "ray.worker.gpu", "max_workers"), "4"), jsonschema.ValidationError),
        (_set(("docker", "imagee"), "x"), jsonschema.ValidationError),
        (_set(("head_node_type",), "ray.head.missing"), ValueError),
        (_set(("available_node_types", "ray.worker.gpu", "min_workers"), 9), ValueError),  # > max_workers
    ],
    ids=["missing-cluster_name", "bogus-key", "node-type-typo", "wrong-type", "docker-typo",
         "unknown-head-type", "min-over-global-max"],
)
def test_broken_configs_are_rejected(config: dict, mutate, error) -> None:
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(error):
        validate_config(broken)
