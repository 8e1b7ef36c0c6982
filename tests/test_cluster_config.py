"""cluster.yaml (AWS) and deploy/gcp/cluster.yaml against the Ray cluster launcher's own checks.

`ray up` runs `prepare_config` (merge with the provider's defaults.yaml, fill node-type bounds)
and then `validate_config` (ray/autoscaler/ray-schema.json + the launcher's cross-field rules)
before it touches the cloud; both are run here without credentials. Deliberately broken copies
prove the check can fail. deploy/serve-cluster.yaml is checked with Serve's own config schema.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [ROOT / "cluster.yaml", ROOT / "deploy" / "gcp" / "cluster.yaml"]
pytestmark = pytest.mark.timeout(120)


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def launcher_check(config: dict) -> dict:
    """What `ray up` does to a config before it starts any node."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cluster_config_passes_the_launcher_schema(path: Path) -> None:
    prepared = launcher_check(load(path))
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert set(types) == {"head", "cpu_data", "gpu_train", "gpu_serve"}
    assert types["head"]["resources"].get("CPU") == 0, "nothing but the control plane on the head"
    for name in ("cpu_data", "gpu_train", "gpu_serve"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert sum(types[n]["max_workers"] for n in types) - types["head"]["max_workers"] >= 8
    assert types["gpu_serve"]["resources"].get("serve_node") == 1


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cluster_config_pins_the_project_versions(path: Path) -> None:
    config = load(path)
    image = config["docker"]["image"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert image == f"rayproject/ray:{ray.__version__}-{py}-gpu", image
    commands = " ".join(config["setup_commands"])
    assert "pip install" in commands and "/home/ray/dermanet" in commands
    assert config["file_mounts"]["/home/ray/dermanet"] == "."
    for excluded in (".venv", ".git", "data", "outputs"):
        assert excluded in config["rsync_exclude"]
    for start in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c for c in config[start])
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_spot_only_where_a_loss_is_survivable() -> None:
    """Training and data workers are spot (checkpoints + retries); head and Serve are not."""
    types = load(ROOT / "cluster.yaml")["available_node_types"]
    spot = {n for n, t in types.items() if "InstanceMarketOptions" in t["node_config"]}
    assert spot == {"cpu_data", "gpu_train"}
    assert types["gpu_train"]["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))
    gcp = load(ROOT / "deploy" / "gcp" / "cluster.yaml")["available_node_types"]
    preempt = {
        n for n, t in gcp.items() if t["node_config"].get("scheduling", {}).get("preemptible")
    }
    assert preempt == {"cpu_data", "gpu_train"}


def _break_unknown_key(c: dict) -> None:
    c["available_node_types"]["gpu_train"]["min_worker"] = 1  # typo of min_workers


def _break_type(c: dict) -> None:
    c["available_node_types"]["gpu_train"]["max_workers"] = "eight"


def _break_top_level(c: dict) -> None:
    c["worker_instance_type"] = "g5.2xlarge"  # not a launcher field


def _break_head_type(c: dict) -> None:
    c["head_node_type"] = "ray.head.default"  # not one of available_node_types


def _break_bounds(c: dict) -> None:
    c["max_workers"] = 1
    c["available_node_types"]["cpu_data"]["min_workers"] = 2


def _break_resources(c: dict) -> None:
    c["available_node_types"]["gpu_serve"]["resources"] = {"serve_node": 0.5}  # ints only


@pytest.mark.parametrize(
    "breaker",
    [
        _break_unknown_key,
        _break_type,
        _break_top_level,
        _break_head_type,
        _break_bounds,
        _break_resources,
    ],
)
def test_broken_copies_are_rejected(breaker) -> None:
    config = load(ROOT / "cluster.yaml")
    launcher_check(config)  # the original passes ...
    broken = copy.deepcopy(config)
    breaker(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):  # ... the broken copy does not
        launcher_check(broken)


def test_serve_cluster_config_passes_serves_schema_and_fits_the_cluster() -> None:
    from ray.serve.schema import ServeDeploySchema

    for path in (ROOT / "deploy" / "serve-cluster.yaml", ROOT / "serve" / "config.yaml"):
        ServeDeploySchema.model_validate(load(path))
    app = load(ROOT / "deploy" / "serve-cluster.yaml")["applications"][0]
    local = load(ROOT / "serve" / "config.yaml")["applications"][0]
    assert app["import_path"] == local["import_path"]
    assert set(app["args"]) == set(local["args"]), "same ServeSettings keys as serve/config.yaml"
    types = load(ROOT / "cluster.yaml")["available_node_types"]
    for deployment in app["deployments"]:
        opts = deployment["ray_actor_options"]
        assert deployment.get("max_ongoing_requests", 5) >= app["args"]["max_batch_size"] or (
            deployment["name"] != "Classifier"
        )
        for resource in opts.get("resources", {}):
            assert any(resource in t["resources"] for t in types.values()), resource


def test_sync_models_copies_a_registry_and_tolerates_a_missing_one(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import sync_models
    finally:
        sys.path.pop(0)
    source = tmp_path / "registry"
    (source / "sub").mkdir(parents=True)
    (source / "default.pt").write_bytes(b"weights")
    (source / "sub" / "card.md").write_text("card")
    target = tmp_path / "models"
    assert sync_models.sync(f"file://{source}", str(target)) == 0
    assert (target / "default.pt").read_bytes() == b"weights"
    assert (target / "sub" / "card.md").read_text() == "card"
    assert sync_models.sync(f"file://{tmp_path}/absent", str(tmp_path / "empty")) == 0
    assert (tmp_path / "empty").is_dir()
