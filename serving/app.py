"""The Ray Serve application: its configuration (one pydantic model for `adept serve`, `serve run` and
KubeRay's serveConfigV2) and the builder function Serve's `import_path` names: `serving.app:build_app`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import ray
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from ray.serve import Application

from serving.config import EngineConfig
from workers.model_store import DEFAULT_MODEL

APP_NAME = "adept"
GRPC_SERVICE = "adept.v1.AdeptService"
# What Serve's gRPC proxy serves: the project's service and the standard health service (grpc.health.v1).
GRPC_SERVICERS = [
    "serving.grpc_service.add_AdeptServiceServicer_to_server",
    "serving.grpc_service.add_HealthServicer_to_server",
]
API_KEYS_ENV = "ADEPT_API_KEYS"


class Listener(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(description="address to bind: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    port: int = Field(ge=1, le=65535)


class AppConfig(BaseModel):
    """Everything about one ADEPT Serve application. `engine` shapes each pipeline; the rest places the
    pipelines on the cluster. `http` and `grpc` are used by `adept serve` (on KubeRay, Serve's own
    `http_options` / `grpc_options` apply)."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    model_name: str | None = Field(
        None, description=f"the name clients ask for; default: {DEFAULT_MODEL!r} or the folder's name"
    )
    num_pipelines: int = Field(1, ge=1, description="router replicas, each with its own layer-group workers")
    ingress_replicas: int = Field(1, ge=1)
    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="gpu: one GPU per layer-group worker; auto: gpu if the Ray cluster has GPUs when built"
    )
    worker_resources: dict[str, float] | None = Field(
        None, description="Ray resources of one layer-group worker; default {CPU: 1, GPU: 1} or, on CPUs, {CPU: 0.25}"
    )
    worker_threads: int | None = Field(
        None, ge=1, description="torch threads per worker; default: Ray's, the worker's CPU share (at least 1)"
    )
    worker_max_restarts: int = Field(
        3, ge=0, description="times Ray restarts a layer-group worker that died; the router rebuilds its cache"
    )
    router_cpus: float = Field(0.1, ge=0)
    max_request_bytes: int = Field(1 << 20, ge=1024, description="largest HTTP request body")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description=f"keys clients must send (Authorization: Bearer KEY); also {API_KEYS_ENV}, comma-separated, "
        "in the replicas' environment; none: no authentication",
    )
    trace_sampling_ratio: float = Field(
        0.01,
        ge=0,
        le=1,
        description="requests traced when OTEL_EXPORTER_OTLP_ENDPOINT is set (a sampled "
        "incoming traceparent always is); `adept serve` only: on KubeRay, serveConfigV2's tracing_config",
    )
    http: Listener = Field(default_factory=lambda: Listener(host="127.0.0.1", port=8000))
    grpc: Listener = Field(default_factory=lambda: Listener(host="127.0.0.1", port=9000))

    @classmethod
    def from_yaml(cls, path: str | Path) -> AppConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})

    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        return self.engine.model if self.engine.model == DEFAULT_MODEL else Path(self.engine.model).name

    def accepted_keys(self) -> list[str]:
        """The configured API keys and those in the environment (a Kubernetes Secret, say) of this process."""
        from_env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")]
        return [k.get_secret_value() for k in self.api_keys] + [k for k in from_env if k]

    def uses_gpus(self) -> bool:
        if self.accelerator == "auto":
            return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        return self.accelerator == "gpu"

    def worker_bundle(self, gpus: bool) -> dict[str, float]:
        if self.worker_resources is not None:
            return self.worker_resources
        return {"CPU": 1.0, "GPU": 1.0} if gpus else {"CPU": 0.25}


def build_app(args: AppConfig | dict) -> Application:
    """Serve's builder: `import_path: serving.app:build_app` with `args:` the fields of AppConfig."""
    from serving.ingress import Ingress
    from serving.router import Router

    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    worker = config.worker_bundle(config.uses_gpus())
    # One placement group per pipeline: the router in bundle 0, layer group i in bundle i + 1.
    bundles = [{"CPU": config.router_cpus}] + [worker] * config.engine.num_layer_groups
    streams = config.engine.max_num_seqs + config.engine.max_waiting_requests
    router = Router.options(
        num_replicas=config.num_pipelines,
        placement_group_bundles=bundles,
        placement_group_strategy="PACK",
        ray_actor_options={"num_cpus": config.router_cpus},
        max_ongoing_requests=streams + 16,  # the engine's own admission queue refuses beyond its limit
    ).bind(config, worker)
    return Ingress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=streams * config.num_pipelines + 64,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(router, config)
