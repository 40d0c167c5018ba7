"""KubeRay manifests: valid against KubeRay's own CRD schemas, and big enough for the plan of the config they run."""

from __future__ import annotations

import functools
import shlex

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.plan import make_plan, placement_problems
from tests.helpers import REPO, SHARED

KUBERAY = SHARED / "data" / "kuberay"
MANIFESTS = sorted((REPO / "clusters" / "kuberay").glob("ray*.yaml"))
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def load(path):
    with open(path) as handle:
        return yaml.safe_load(handle)


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    crd = load(KUBERAY / CRDS[kind])
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def config_path(doc: dict) -> str:
    if doc["kind"] == "RayJob":
        words = shlex.split(doc["spec"]["entrypoint"])
        assert words[:2] == ["loom", "train"], words
        return words[2]
    return doc["metadata"]["annotations"]["loom/config"]


def quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_node(group: dict) -> dict[str, float]:
    """The Ray resources a pod of this group advertises: rayStartParams first, else the container's limits."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    return {
        "CPU": quantity(params.get("num-cpus", limits.get("cpu", 0))),
        "GPU": quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }


def ray_nodes(spec: dict) -> list[dict[str, float]]:
    nodes = [ray_node(spec["headGroupSpec"])]
    for group in spec["workerGroupSpecs"]:
        nodes += [ray_node(group)] * group["replicas"]
    return nodes


@pytest.fixture
def stand_in_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_there_are_cpu_and_gpu_manifests_of_both_kinds():
    kinds = {(load(p)["kind"], "gpu" in p.name) for p in MANIFESTS}
    assert kinds == {("RayCluster", False), ("RayCluster", True), ("RayJob", False), ("RayJob", True)}


@pytest.mark.skipif(not KUBERAY.is_dir(), reason="../shared/data/kuberay is absent")
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kuberay_crd(manifest):
    from jsonschema import Draft7Validator

    doc = load(manifest)
    schema = crd_schema(doc["kind"], doc["apiVersion"].split("/")[1])
    errors = sorted(Draft7Validator(schema).iter_errors(doc), key=str)
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_holds_the_plan_of_its_config(manifest, stand_in_model, monkeypatch):
    monkeypatch.chdir(REPO)
    doc = load(manifest)
    cfg = load_config(config_path(doc), [f"model_name_or_path={stand_in_model}"])
    spec = cluster_spec(doc)
    nodes = ray_nodes(spec)
    assert placement_problems(make_plan(cfg, "/"), nodes) == []
    assert nodes[0]["GPU"] == 0 and nodes[0]["CPU"] == 0  # the head holds no GPU and runs no training
    mounts = {m["mountPath"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for m in g["template"]["spec"]["containers"][0]["volumeMounts"]}  # fmt: skip
    assert mounts == {"/shared"} and cfg.ray_storage_path.startswith("/shared/")  # every pod sees the checkpoints
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypointNumCpus"] == 0


def test_a_smaller_cluster_would_be_refused(stand_in_model, monkeypatch):
    monkeypatch.chdir(REPO)
    doc = load(REPO / "clusters" / "kuberay" / "rayjob-2x8gpu.yaml")
    spec = cluster_spec(doc)
    spec["workerGroupSpecs"][0]["replicas"] = 1
    cfg = load_config(config_path(doc), [f"model_name_or_path={stand_in_model}"])
    assert "needs 16 GPU, cluster has 8 GPU" in placement_problems(make_plan(cfg, "/"), ray_nodes(spec))[0]
