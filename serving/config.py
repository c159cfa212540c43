"""Engine configuration (pydantic; from YAML, environment variables ADEPT_*, or Python) and the pipeline
plan derived from it: how the model's layers split into groups and where the exit points are."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.params import ExitLimits, ExitParams
from workers.arch import ModelArch
from workers.layer_group import GroupSpec
from workers.model_store import DEFAULT_MODEL

# The default context per sequence: every slot preallocates K/V for this many positions.
DEFAULT_MAX_MODEL_LEN = 2048


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
    max_num_seqs: int = Field(8, ge=1, description="KV cache slots: sequences in progress at once")
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


@dataclass(frozen=True)
class PipelinePlan:
    num_layers: int
    groups: tuple[GroupSpec, ...]
    exit_points: tuple[int, ...]
    min_exit_depth: int
    max_model_len: int

    def limits(self, has_routers: bool) -> ExitLimits:
        return ExitLimits(self.num_layers, self.min_exit_depth, self.exit_points, has_routers)


def default_exit_points(num_layers: int, min_depth: int) -> list[int]:
    """Every ~num_layers/8 layers from the minimum depth on, plus the last layer (30 layers: 8, 12, ..., 28, 30)."""
    step = max(1, round(num_layers / 8))
    return sorted({d for d in range(step, num_layers, step) if d >= min_depth} | {num_layers})


def plan_pipeline(config: EngineConfig, arch: ModelArch, pack_points: list[int] | None = None) -> PipelinePlan:
    """Groups and exit points: the configured points, else the exit pack's (where it trained heads), else
    the defaults."""
    n = arch.num_layers
    max_len = config.max_model_len or min(DEFAULT_MAX_MODEL_LEN, arch.max_position_embeddings)
    if max_len > arch.max_position_embeddings:
        raise ValueError(f"max_model_len {max_len} exceeds the model's {arch.max_position_embeddings} positions")
    groups = config.num_layer_groups
    if groups > n:
        raise ValueError(f"num_layer_groups {groups} exceeds the model's {n} layers")
    bounds = [0, *(config.layer_boundaries or [round(i * n / groups) for i in range(1, groups)]), n]
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"layer group boundaries {bounds[1:-1]} must increase strictly within (0, {n})")
    min_depth = config.min_exit_depth or max(1, n // 4)
    points = sorted(set(config.exit_points or pack_points or default_exit_points(n, min_depth)) | {n})
    if points[0] < 1 or points[-1] > n:
        raise ValueError(f"exit points must be depths in [1, {n}], got {points}")
    specs = tuple(
        GroupSpec(
            start=a,
            end=b,
            exit_points=tuple(p for p in points if a < p <= b),
            num_slots=config.max_num_seqs,
            max_len=max_len,
        )
        for a, b in itertools.pairwise(bounds)
    )
    return PipelinePlan(
        num_layers=n, groups=specs, exit_points=tuple(points), min_exit_depth=min_depth, max_model_len=max_len
    )
