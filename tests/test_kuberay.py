"""The KubeRay manifests (kuberay/) against KubeRay's CustomResourceDefinitions, offline: every
field a field of the resource's OpenAPI v3 schema with its type (unknown fields refused, which
Kubernetes would drop silently), the RayJob's cluster the RayCluster's, and the pins those of the
README, pyproject.toml and cluster.yaml. The CRDs are ../shared/kuberay/ (KubeRay v1.7.0-rc.0)."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

jsonschema = pytest.importorskip("jsonschema")

CRDS = ROOT.parent / "shared" / "kuberay"
MANIFESTS = ROOT / "kuberay"


def strict(schema: dict) -> dict:
    """The schema with unknown fields refused wherever it lists the fields of an object (a
    structural Kubernetes schema prunes them instead), except where it keeps unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def validator(kind: str):
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay's CRDs are not at {CRDS}")
    return _validator(path, kind)


@functools.lru_cache(maxsize=2)
def _validator(path: Path, kind: str):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def errors(kind: str, manifest: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind).iter_errors(manifest)]


def load(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


def test_the_manifests_validate_against_kuberays_schemas():
    assert errors("RayCluster", load("raycluster.yaml")) == []
    assert errors("RayJob", load("rayjob.yaml")) == []


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda m: m["spec"].update(shutdownAfterJobFinish=True), "'shutdownAfterJobFinish' was unexpected"),
        (
            lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="4"),
            "is not of type 'integer'",
        ),
        (lambda m: m["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"), "is not one of"),
        (
            lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(serviceAcount="x"),
            "unexpected",
        ),
    ],
)
def test_a_broken_manifest_fails_the_schema(break_it, message):
    manifest = load("rayjob.yaml")
    break_it(manifest)
    found = errors("RayJob", manifest)
    assert found and any(message in e for e in found), found


def test_the_job_runs_on_the_cluster_described_and_deletes_it():
    job, cluster = load("rayjob.yaml"), load("raycluster.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["entrypoint"].startswith("raystudy ")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"] == {"mode": "token"}
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs drivers, no trials


def test_no_credential_in_any_manifest_and_every_pod_has_the_service_account():
    for path in MANIFESTS.glob("*.yaml"):
        text = path.read_text()
        assert not re.search(
            r"AWS_(SECRET_)?ACCESS_KEY|AWS_SESSION_TOKEN|GOOGLE_APPLICATION_CREDENTIALS|RAY_AUTH_TOKEN", text
        )
    spec = load("raycluster.yaml")["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    assert all(t["spec"]["serviceAccountName"] == "raystudy" for t in templates)
    account = load("serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "raystudy"


def test_the_image_pins_the_ray_and_torch_of_the_readme_and_cluster_yaml():
    import tomllib

    ray_pin = next(
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("ray[")
    ).split("==")[1]
    readme = (ROOT / "README.md").read_text()
    torch_pins = re.search(r"pip install (torch==\S+ torchvision==\S+)", readme).group(1)
    assert torch_pins in (ROOT / "cluster.yaml").read_text()
    dockerfile = (MANIFESTS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_pin}-" in dockerfile and torch_pins in dockerfile
    assert f'"ray[default]=={ray_pin}"' in dockerfile
    spec = load("raycluster.yaml")["spec"]
    assert spec["rayVersion"] == ray_pin
