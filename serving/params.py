"""Per-request parameters: sampling and early exit. Pydantic at the edge; resolved dataclasses inside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.exceptions import RequestError
from workers.modes import Backfill, Policy

PolicyName = Literal["none", "static", "confidence", "learned"]
BackfillName = Literal["exact", "decoupled", "mapped"]
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


def request_error(error: ValidationError, prefix: str = "") -> RequestError:
    """The first pydantic error as a RequestError naming the field (e.g. `top_p: must be > 0`)."""
    first = error.errors()[0]
    param = prefix + ".".join(str(p) for p in first["loc"]) if first["loc"] else prefix.rstrip(".") or "request"
    return RequestError(param, first["msg"])


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, description="new tokens at most; default: what the context allows")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 is off")
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same output")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    ignore_eos: bool = False
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="log-probability of each token, plus this many alternatives"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v: object) -> object:
        return [v] if isinstance(v, str) else ([] if v is None else v)

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v


class ExitParams(BaseModel):
    """Early-exit controls of one request; unset fields take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicyName | None = None
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    min_depth: int | None = Field(None, ge=1, description="no exit before this many layers")
    max_depth: int | None = Field(None, ge=1, description="exit by this depth (static: the fixed depth)")
    backfill: BackfillName | None = None


@dataclass(frozen=True)
class ResolvedExit:
    policy: Policy
    threshold: float
    min_depth: int
    max_depth: int
    backfill: Backfill

    @property
    def name(self) -> str:
        return self.policy.name.lower()


@dataclass(frozen=True)
class ExitLimits:
    """What the server allows: depths in [min_depth, num_layers], policies it can serve."""

    num_layers: int
    min_depth: int
    exit_points: tuple[int, ...]
    has_routers: bool


def resolve_exit(request: ExitParams, defaults: ExitParams, limits: ExitLimits) -> ResolvedExit:
    """Merge a request's exit controls over the server defaults and check them against the limits."""
    merged = defaults.model_dump()
    merged.update(request.model_dump(exclude_none=True))
    policy = merged["policy"] or "none"
    min_depth = merged["min_depth"] or limits.min_depth
    max_depth = merged["max_depth"] or limits.num_layers
    prefix = "adept."
    if min_depth < limits.min_depth:
        raise RequestError(prefix + "min_depth", f"must be at least {limits.min_depth} (the server's minimum depth)")
    for name, value in (("min_depth", min_depth), ("max_depth", max_depth)):
        if value > limits.num_layers:
            raise RequestError(prefix + name, f"must be at most {limits.num_layers} (the model's layers)")
    if max_depth < min_depth:
        raise RequestError(prefix + "max_depth", f"must be at least min_depth ({min_depth})")
    if policy == "static" and request.max_depth is None and defaults.max_depth is None:
        raise RequestError(prefix + "max_depth", "exit policy 'static' needs max_depth, the depth every token exits")
    if policy == "learned" and not limits.has_routers:
        raise RequestError(
            prefix + "policy", "'learned' needs an exit pack with trained routers (adept calibrate); none is loaded"
        )
    return ResolvedExit(
        policy=Policy[policy.upper()],
        threshold=merged["threshold"] if merged["threshold"] is not None else 0.9,
        min_depth=min_depth,
        max_depth=max_depth,
        backfill=Backfill[(merged["backfill"] or "decoupled").upper()],
    )
