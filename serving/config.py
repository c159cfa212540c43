"""Configuration, pydantic at the edge: `EngineConfig` shapes one pipeline (from YAML, environment variables
ADEPT_*, or Python); `AppConfig` is the whole Serve application, the same for `adept serve`, `serve run` and
KubeRay's serveConfigV2 (its `args`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.params import ExitParams
from workers.model_store import DEFAULT_MODEL

# The default context per sequence (the model's, if shorter).
DEFAULT_MAX_MODEL_LEN = 2048
APP_NAME = "adept"
GRPC_SERVICE = "adept.v1.AdeptService"
# What Serve's gRPC proxy serves: the project's service and the standard health service (grpc.health.v1).
GRPC_SERVICERS = [
    "serving.grpc_service.add_AdeptServiceServicer_to_server",
    "serving.grpc_service.add_HealthServicer_to_server",
]
API_KEYS_ENV = "ADEPT_API_KEYS"


class EngineConfig(BaseSettings):
    """Everything that shapes one pipeline. Environment variables: ADEPT_<FIELD>, nested with `__`
    (ADEPT_EXIT__POLICY=confidence); explicit values (YAML, arguments) win over the environment."""

    model_config = SettingsConfigDict(env_prefix="ADEPT_", env_nested_delimiter="__", extra="forbid")

    model: str = Field(DEFAULT_MODEL, description=f"{DEFAULT_MODEL!r} or a local Hugging Face folder")
    num_layer_groups: int = Field(3, ge=1, description="contiguous layer groups (one worker each)")
    layer_boundaries: list[int] | None = Field(
        None, description="explicit group starts after layer 0, e.g. [10, 20] for 30 layers in 3 groups"
    )
    exit_points: list[int] | None = Field(
        None, description="depths (layers run) where tokens may exit; the last layer is always one"
    )
    min_exit_depth: int | None = Field(None, ge=1, description="no request may exit before this depth")
    exit_pack: str = Field(
        "auto",
        description="'auto': the exit pack shipped for the model, if any; 'none'; or a pack folder (adept calibrate)",
    )
    exit: ExitParams = Field(
        default_factory=ExitParams,
        description="early-exit controls of requests that leave them unset; unset here too: the exit pack's "
        "tuned defaults (the shipped pack: policy learned), else policy none",
    )
    max_num_seqs: int = Field(
        128, ge=1, description="sequences in the running batch at most; KV memory usually limits it first"
    )
    kv_cache_memory: int | None = Field(
        None,
        ge=1,
        description="bytes of K/V for one pipeline (all its layer groups); default: 1 GiB on CPUs, and on GPUs "
        "kv_cache_fraction of the memory each worker has left after its weights",
    )
    kv_cache_fraction: float = Field(
        0.9, gt=0, le=1, description="on GPUs without kv_cache_memory: the share of free memory for K/V"
    )
    block_size: int = Field(16, ge=1, le=1024, description="positions per KV block (paged attention)")
    max_model_len: int | None = Field(
        None,
        ge=2,
        description=f"prompt and generated tokens per sequence; default: the model's, at most {DEFAULT_MAX_MODEL_LEN}",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt accepted (a server limit); default: the context less one token"
    )
    max_tokens_limit: int | None = Field(
        None, ge=1, description="most new tokens a request may ask for, and its default; default: the context's room"
    )
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget of one step (prefill chunks)")
    max_waiting_requests: int = Field(256, ge=0, description="admission queue; beyond it requests are refused")
    max_inflight_batches: int = Field(1, ge=1, description="micro-batches in the pipeline at once")
    worker_restart_timeout_s: float = Field(
        120.0, gt=0, description="how long the engine waits for a lost layer-group worker to be restarted"
    )
    sync_backfill: bool = Field(
        False, description="a step waits for its back-fills on every deeper group (slower; a benchmark reference)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.layer_boundaries is not None and len(self.layer_boundaries) != self.num_layer_groups - 1:
            raise ValueError(
                f"layer_boundaries needs {self.num_layer_groups - 1} entries for {self.num_layer_groups} groups"
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: object) -> EngineConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls(**{**data, **overrides})


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
