"""The Kubernetes manifests (deploy/k8s/) are what KubeRay and Kubernetes accept, and what
the project can run.

- every RayCluster / RayJob / RayService against KubeRay v1.7's CRD schemas (`openAPIV3Schema`,
  jsonschema Draft 7; from `$KUBERAY_CRDS`, default ../shared/data/kuberay-crds; skipped when
  absent), every pod template as a `v1/PodTemplate` and the plain objects as themselves with
  kubernetes-validate (strict, the newest Kubernetes it ships); broken copies must fail both;
- the generated files are what deploy/k8s/render.py writes (no hand edits, none stale);
- a GPU worker group requests nvidia.com/gpu; every RayJob's entrypoint names an existing
  jobs/*.py and its flags parse with that job's own parser; storage flags are s3:// or gs://;
- the RayService serves serve/config.yaml's applications, and its import path imports;
- the image: one name everywhere, the Ray version of the image = rayVersion = the installed
  Ray, the working dir and every path the manifests use exist in the image deploy/Dockerfile
  builds.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CRDS = Path(os.environ.get("KUBERAY_CRDS", ROOT.parent / "shared" / "data" / "kuberay-crds"))
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
STORAGE_FLAGS = (
    "--output", "--shards", "--storage-path", "--registry", "--model", "--input",
    "--pretrain-ckpt",
)  # fmt: skip

sys.path.insert(0, str(K8S))
import render  # noqa: E402  (deploy/k8s/render.py: a script, not a package)


def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            docs[f"{path.name}#{i}"] = doc
    return docs


MANIFESTS = manifests()


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {name: m for name, m in MANIFESTS.items() if m["kind"] == kind}


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return {
        "RayCluster": lambda: spec,
        "RayJob": lambda: spec["rayClusterSpec"],
        "RayService": lambda: spec["rayClusterConfig"],
    }[manifest["kind"]]()


def pod_templates(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(manifest)
    return [g["template"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for t in pod_templates(manifest)
        for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])
    ]


SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
RAY_MANIFESTS = {n: m for n, m in MANIFESTS.items() if m["kind"] in CRD_FILES}


@pytest.fixture(scope="module")
def crd_validators():
    from jsonschema import Draft7Validator

    if not all((CRDS / f).is_file() for f in CRD_FILES.values()):
        pytest.skip(f"KubeRay CRDs not found at {CRDS}; set KUBERAY_CRDS to their folder")
    validators = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRDS / name).read_text(), Loader=SafeLoader)  # 1 MB each: libyaml
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[kind] = Draft7Validator(version["schema"]["openAPIV3Schema"])
    return validators


def test_the_expected_objects_are_there() -> None:
    kinds = sorted(m["kind"] for m in RAY_MANIFESTS.values())
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayJob", "RayJob", "RayJob", "RayService"]
    jobs = {Path(shlex.split(m["spec"]["entrypoint"])[1]).stem for m in by_kind("RayJob").values()}
    assert jobs == {"prepare_data", "train", "pretrain_byol", "tune", "predict"}


@pytest.mark.parametrize("name", sorted(RAY_MANIFESTS))
def test_ray_objects_match_the_kuberay_crds(name: str, crd_validators) -> None:
    manifest = RAY_MANIFESTS[name]
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validators[manifest["kind"]].iter_errors(manifest)
    ]
    assert not errors, errors


def test_the_crd_check_rejects_a_broken_manifest(crd_validators) -> None:
    broken = copy.deepcopy(next(iter(by_kind("RayCluster").values())))
    broken["spec"]["workerGroupSpecs"][0]["minReplicas"] = "none"
    broken["spec"]["enableInTreeAutoscaling"] = "yes"
    assert len(list(crd_validators["RayCluster"].iter_errors(broken))) == 2
    job = copy.deepcopy(next(iter(by_kind("RayJob").values())))
    job["spec"]["shutdownAfterJobFinishes"] = "true"
    assert not crd_validators["RayJob"].is_valid(job)


def _validate_k8s(obj: dict[str, Any]) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    kubernetes_validate.validate(obj, latest_version(), strict=True)


def _as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
            "template": template}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_pod_templates_and_plain_objects_are_valid_kubernetes(name: str) -> None:
    manifest = MANIFESTS[name]
    if manifest["kind"] in CRD_FILES:
        for template in pod_templates(manifest):
            _validate_k8s(_as_pod_template(template))
    else:
        _validate_k8s(manifest)


def test_the_kubernetes_check_rejects_a_broken_pod_template() -> None:
    from kubernetes_validate.utils import ValidationError

    template = copy.deepcopy(pod_templates(next(iter(by_kind("RayCluster").values())))[0])
    template["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}  # typo: limits
    with pytest.raises(ValidationError):
        _validate_k8s(_as_pod_template(template))
    template = copy.deepcopy(pod_templates(next(iter(by_kind("RayCluster").values())))[0])
    template["spec"]["containers"][0]["ports"][0]["containerPort"] = "gcs"
    with pytest.raises(ValidationError):
        _validate_k8s(_as_pod_template(template))


def test_generated_manifests_are_up_to_date() -> None:
    stale = [p.name for p, text in render.render().items() if p.read_text() != text]
    assert not stale, f"stale: {stale}; run python deploy/k8s/render.py"


@pytest.mark.parametrize("name", sorted(RAY_MANIFESTS))
def test_gpu_group_requests_gpus_and_groups_autoscale(name: str) -> None:
    spec = cluster_spec(RAY_MANIFESTS[name])
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert int(gpu["limits"]["nvidia.com/gpu"]) >= 1
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"]
    assert "nvidia.com/gpu" not in str(groups["cpu"]) and "nvidia.com/gpu" not in str(
        spec["headGroupSpec"]
    )


def _job_module(script: Path):
    spec = importlib.util.spec_from_file_location(f"k8s_job_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(by_kind("RayJob")))
def test_job_entrypoints_run_a_real_job_with_flags_it_accepts(name: str) -> None:
    job = by_kind("RayJob")[name]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    assert argv[1].startswith(render.APP_DIR + "/jobs/"), argv[1]
    script = ROOT / Path(argv[1]).relative_to(render.APP_DIR)
    assert script.is_file(), f"{argv[1]}: no {script.relative_to(ROOT)} in the project"
    args = _job_module(script).build_parser().parse_args(argv[2:])  # exits 2 on a bad flag
    for flag in STORAGE_FLAGS:
        if flag in argv:
            value = getattr(args, flag[2:].replace("-", "_"))
            assert re.match(r"(s3|gs)://[a-z0-9.-]+/", value), f"{flag} {value}: not a bucket"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    if "--use-gpu" in argv:
        assert args.use_gpu is True


def test_the_entrypoint_check_rejects_an_unknown_flag() -> None:
    script = ROOT / "jobs" / "train.py"
    with pytest.raises(SystemExit):
        _job_module(script).build_parser().parse_args(["--placement-strategy", "EVERYWHERE"])


def test_storage_is_a_bucket_everywhere() -> None:
    for name, manifest in RAY_MANIFESTS.items():
        for container in containers(manifest):
            for env in container.get("env", []):
                if env["name"] == "DERMANET_STORAGE":
                    assert env["value"].startswith(("s3://", "gs://")), name
            if container["name"] == "sync-models":
                assert container["command"][2].startswith(("s3://", "gs://")), name


def test_the_service_serves_the_serve_config_applications() -> None:
    (service,) = by_kind("RayService").values()
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    assert served["applications"] == config["applications"]
    assert served["http_options"]["host"] == "0.0.0.0"  # reachable through the pod's service
    assert served["http_options"]["port"] == 8000
    (app,) = served["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    # The service pods load the registry from the bucket into the folder Serve reads.
    for template in pod_templates(service):
        (sync,) = template["spec"]["initContainers"]
        assert sync["command"][-1] == render.MODEL_DIR
        assert (ROOT / Path(sync["command"][1]).relative_to(render.APP_DIR)).is_file()
        # Every replica shares the case database (PostgreSQL from a Secret) and image folder.
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                  for v in template["spec"]["volumes"]}  # fmt: skip
        assert claims["cases"] == "dermanet-cases"
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["DERMANET_DATA_DIR"]["value"] == render.CASES_DIR
            secret = env["DERMANET_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert secret == {"name": "dermanet-database", "key": "url"}


def test_the_image_is_what_deploy_dockerfile_builds() -> None:
    import ray

    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py(\d)(\d+)", dockerfile, re.M)
    assert base and base.group(1) == ray.__version__
    assert (int(base.group(2)), int(base.group(3))) == sys.version_info[:2]
    workdir = re.findall(r"^WORKDIR (\S+)", dockerfile, re.M)[-1]
    assert workdir == render.APP_DIR
    copied = set(re.findall(rf"^COPY .* {re.escape(render.APP_DIR)}/(\w+)$", dockerfile, re.M))
    assert {"dermanet", "jobs", "serve", "configs", "deploy"} <= copied
    assert f"DERMANET_MODEL_DIR={render.MODEL_DIR}" in dockerfile
    images = {c["image"] for m in RAY_MANIFESTS.values() for c in containers(m)}
    assert images == {f"ghcr.io/dermanet/dermanet:{version}"}
    for manifest in RAY_MANIFESTS.values():
        assert cluster_spec(manifest)["rayVersion"] == ray.__version__
        for container in containers(manifest):
            if "workingDir" in container:
                assert container["workingDir"] == workdir
