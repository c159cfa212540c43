"""Per-request parameters: sampling and early exit. Pydantic at the edge; resolved dataclasses inside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from serving.engine.exceptions import RequestError
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

    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="log-probability of each prompt token after the first (at the exit it took), plus this many "
        "alternatives",
    )  # before max_tokens: its check reads this
    max_tokens: int | None = Field(
        None, ge=0, description="new tokens at most; default: what the context allows; 0: score the prompt only"
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 is off")
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same output")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    ignore_eos: bool = False
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="log-probability of each token, plus this many alternatives"
    )

    @field_validator("max_tokens")
    @classmethod
    def _nothing_only_when_scoring(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v == 0 and info.data.get("prompt_logprobs") is None:
            raise ValueError("0 generates nothing: it only scores the prompt (with prompt_logprobs, or echo)")
        return v

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


class _PhaseExit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: PolicyName | None = None
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    min_depth: int | None = Field(None, ge=1, description="no exit before this many layers")
    max_depth: int | None = Field(None, ge=1, description="exit by this depth (static: the fixed depth)")
    backfill: BackfillName | None = None


class PrefillExitParams(_PhaseExit):
    """Exit controls of prompt tokens; unset fields take the request's own (`adept`), then the server's
    defaults (its prefill defaults only where the request sets no controls of its own)."""

    full_depth_last: int | None = Field(
        None, ge=0, description="the last N prompt positions run at full depth (the last one samples the first token)"
    )


class ExitParams(_PhaseExit):
    """Early-exit controls of one request; unset fields take the server's defaults. `prefill` sets prompt
    tokens apart."""

    prefill: PrefillExitParams | None = None


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
class PhaseExits:
    """A request's resolved exit controls: for generated tokens, for prompt tokens, and how many of the
    last prompt positions run at full depth."""

    decode: ResolvedExit
    prefill: ResolvedExit
    full_depth_last: int = 0

    @staticmethod
    def same(exit: ResolvedExit) -> PhaseExits:
        return PhaseExits(exit, exit, 0)

    def at(self, position: int, prompt_len: int) -> ResolvedExit:
        if position >= prompt_len:
            return self.decode
        if position >= prompt_len - self.full_depth_last:
            return FULL_DEPTH
        return self.prefill


@dataclass(frozen=True)
class ExitLimits:
    """What the server allows: depths in [min_depth, num_layers], policies it can serve."""

    num_layers: int
    min_depth: int
    exit_points: tuple[int, ...]
    has_routers: bool


def resolve_exit(request: ExitParams, defaults: ExitParams, limits: ExitLimits) -> PhaseExits:
    """Merge a request's exit controls over the server defaults and check them against the limits. Prompt
    tokens: the request's `prefill`, then its own controls, then the defaults. The defaults' `prefill`
    applies only to requests that set no controls of their own: a request's own are its prompt tokens' too."""
    own = request.model_dump(exclude_none=True, exclude={"prefill"})
    base = defaults.model_dump(exclude={"prefill"})
    decode = _resolve(own, base, limits, "adept.")
    prefill_defaults = base
    if defaults.prefill is not None and not own:
        prefill_defaults = {**base, **defaults.prefill.model_dump(exclude_none=True)}
    prefill_request = {**own, **(request.prefill.model_dump(exclude_none=True) if request.prefill else {})}
    prefill = _resolve(prefill_request, prefill_defaults, limits, "adept.prefill.")
    full_depth_last = prefill_request.get("full_depth_last", prefill_defaults.get("full_depth_last")) or 0
    return PhaseExits(decode, prefill, full_depth_last)


def _resolve(request: dict, defaults: dict, limits: ExitLimits, prefix: str) -> ResolvedExit:
    """One phase's controls: the request's set fields over the defaults, checked against the limits."""
    merged = {**defaults, **request}
    policy = merged.get("policy") or "none"
    min_depth = merged.get("min_depth") or limits.min_depth
    max_depth = merged.get("max_depth") or limits.num_layers
    if min_depth < limits.min_depth:
        raise RequestError(prefix + "min_depth", f"must be at least {limits.min_depth} (the server's minimum depth)")
    for name, value in (("min_depth", min_depth), ("max_depth", max_depth)):
        if value > limits.num_layers:
            raise RequestError(prefix + name, f"must be at most {limits.num_layers} (the model's layers)")
    if max_depth < min_depth:
        raise RequestError(prefix + "max_depth", f"must be at least min_depth ({min_depth})")
    if policy == "static" and request.get("max_depth") is None and defaults.get("max_depth") is None:
        raise RequestError(prefix + "max_depth", "exit policy 'static' needs max_depth, the depth every token exits")
    if policy == "learned" and not limits.has_routers:
        raise RequestError(
            prefix + "policy", "'learned' needs an exit pack with trained routers (adept calibrate); none is loaded"
        )
    return ResolvedExit(
        policy=Policy[policy.upper()],
        threshold=merged["threshold"] if merged.get("threshold") is not None else 0.9,
        min_depth=min_depth,
        max_depth=max_depth,
        backfill=Backfill[(merged.get("backfill") or "decoupled").upper()],
    )


FULL_DEPTH = ResolvedExit(Policy.NONE, 0.9, 1, 10**6, Backfill.DECOUPLED)
