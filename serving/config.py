"""Configuration, pydantic at the edge: `AppConfig` is the whole Serve application, the same for `adept serve`,
`serve run` and KubeRay's serveConfigV2 (its `args`); its `engine` is the engine's own `EngineConfig`
(serving/engine/config.py), which shapes each pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from serving.engine.config import EngineConfig
from workers.model_store import DEFAULT_MODEL

APP_NAME = "adept"
GRPC_SERVICE = "adept.v1.AdeptService"
# What Serve's gRPC proxy serves: the project's service and the standard health service (grpc.health.v1).
GRPC_SERVICERS = [
    "serving.api.grpc_service.add_AdeptServiceServicer_to_server",
    "serving.api.grpc_service.add_HealthServicer_to_server",
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
    num_pipelines: int = Field(1, ge=1, description="pipeline replicas, each with its own layer-group workers")
    ingress_replicas: int = Field(1, ge=1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how a pipeline's placement group (its replica and layer-group workers) lies on the "
        "cluster's nodes (Ray's strategies): PACK on as few nodes as fit, SPREAD across nodes",
    )  # fmt: skip
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
        3, ge=0, description="times Ray restarts a layer-group worker that died; its pipeline replica rebuilds its KV"
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, le=25, description="adept serve stopping (SIGINT, SIGTERM): seconds admitted requests get to "
        "finish; the rest end with finish_reason 'abort'",
    )  # fmt: skip
    router_cpus: float = Field(0.1, ge=0, description="CPUs of a pipeline replica (the actor running the engine)")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="largest HTTP request body")
    max_prompts_per_request: int = Field(
        64, ge=1, description="prompts one /v1/completions request may carry (one choice each)"
    )
    stream_interval: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="tokens per streamed chunk after the first (vLLM's --stream-interval); 'auto': 1 while a "
        "pipeline runs up to 16 sequences, beyond that one more per 16 (at most 8), since under heavy load "
        "fewer and larger chunks cost the serving processes less per token",
    )
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
            import ray  # here, not at the top: the configuration stays importable without Ray

            return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        return self.accelerator == "gpu"

    def worker_bundle(self, gpus: bool) -> dict[str, float]:
        if self.worker_resources is not None:
            return self.worker_resources
        return {"CPU": 1.0, "GPU": 1.0} if gpus else {"CPU": 0.25}
