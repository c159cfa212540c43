"""Self-speculative decoding: the exit head at the draft depth drafts the next tokens, the deeper layer
groups verify them in one pass, and the full model's tokens are what a request gets (LayerSkip, Draft &
Verify). Lossless: greedy output is full depth's token for token.

A round of one sequence, whose next token t (the full model's) is unfed at position b:
- draft: t, then each drafted token, run through the layers up to the draft depth D (one row a step, beside
  the other sequences' rows); the exit head at D drafts x1..xk, and the K/V of layers below D is written as
  full depth would write it. A last step feeds xk (no head) so that every position has its hidden state at D.
- verify: positions b..b+k enter the group that starts at D with those hidden states and run the remaining
  layers in one call per group; position b+i's token y(i+1) checks x(i+1). The longest agreeing prefix is
  kept, plus the full model's next token (a correction, or a bonus when all k agree).
- roll back: the rejected positions' K/V is forgotten in every group (per position: the cache's fill map
  must not vouch for stale K/V), and the next round starts at the first unverified token.

Scheduler and engine know rounds only through `SpecState`; the layer groups know drafts only as rows whose
back-fill mode is DRAFT (they stop at D, write no K/V past it and hand back their hidden state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.engine.exceptions import RequestError
from serving.engine.params import ResolvedExit
from workers.modes import Backfill, Policy
from workers.protocol import GroupSpec, TokenResults

MAX_SPECULATIVE_TOKENS = 16


class SpeculativeParams(BaseModel):
    """Speculative decoding of one request, or the server's default (`engine.speculative`)."""

    model_config = ConfigDict(extra="forbid")

    num_tokens: int = Field(0, ge=0, le=MAX_SPECULATIVE_TOKENS, description="tokens drafted per round at most; 0: off")
    draft_depth: int | Literal["auto"] = Field(
        "auto", description="layers the drafts run (a layer-group boundary); 'auto': the deepest boundary"
    )

    @field_validator("draft_depth", mode="before")
    @classmethod
    def _depth_or_auto(cls, v: object) -> object:
        """Named as the field itself when wrong, not as one member of its union."""
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool)):
            return v
        if isinstance(v, str) and v.strip().isdigit():  # environment variables, flags
            return int(v)
        raise ValueError("must be a layer-group boundary (an integer) or 'auto'")


@dataclass(frozen=True)
class SpecConfig:
    """A request's resolved speculative mode: drafts per round, their depth, the group verification enters."""

    num_tokens: int
    depth: int
    group: int

    @property
    def draft_exit(self) -> ResolvedExit:
        return ResolvedExit(Policy.STATIC, 0.0, 1, self.depth, Backfill.DRAFT)


def draft_depths(groups: tuple[GroupSpec, ...]) -> list[int]:
    """Depths a draft can stop at: the layer-group boundaries (verification is one call per deeper group)."""
    return [g.start for g in groups[1:]]


def resolve_speculative(
    request: SpeculativeParams | dict | None, default: SpeculativeParams, groups: tuple[GroupSpec, ...]
) -> SpecConfig | None:
    """A request's speculative mode (the fields it leaves unset: the server's default), checked against the
    pipeline's groups; None when off."""
    if request is None:
        params = default
    else:
        given = request if isinstance(request, SpeculativeParams) else SpeculativeParams.model_validate(request)
        params = default.model_copy(update=given.model_dump(exclude_unset=True))
    if params.num_tokens == 0:
        return None
    depths = draft_depths(groups)
    if not depths:
        raise RequestError(
            "adept.speculative", "speculative decoding needs at least two layer groups (drafts stop at a boundary)"
        )
    depth = depths[-1] if params.draft_depth == "auto" else params.draft_depth
    if depth not in depths:
        raise RequestError(
            "adept.speculative.draft_depth",
            f"{depth} is not a layer-group boundary of this server ({', '.join(map(str, depths))}); pick one of "
            "those or 'auto'",
        )
    return SpecConfig(params.num_tokens, depth, depths.index(depth) + 1)


@dataclass
class SpecState:
    """One sequence's speculative round: k drafts planned, positions fed so far (t, x1, ..., xk: k + 1), the
    drafted tokens and every fed position's hidden state at the draft depth; totals for usage."""

    config: SpecConfig
    k: int = 0
    fed: int = 0
    drafts: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    drafted: int = 0  # tokens drafted in every verified round
    accepted: int = 0  # of which the full model kept

    @property
    def drafting(self) -> bool:
        return self.k > 0 and self.fed <= self.k

    @property
    def verifying(self) -> bool:
        return self.k > 0 and self.fed == self.k + 1

    def start(self, room: int) -> None:
        """A new round with at most `room` drafts (0: this step decodes plainly, at full depth)."""
        self.k, self.fed = min(self.config.num_tokens, max(room, 0)), 0
        self.drafts, self.hidden = [], []

    def reset(self) -> None:
        """Drafts discarded (preempted, or the K/V rebuilt): the next round starts afresh."""
        self.k, self.fed, self.drafts, self.hidden = 0, 0, [], []

    def input_token(self, next_token: int) -> int:
        """The token the next draft step feeds: the round's first (the full model's) or the last draft."""
        return next_token if self.fed == 0 else self.drafts[self.fed - 1]

    def fed_one(self, hidden: torch.Tensor, token: int | None) -> None:
        self.hidden.append(hidden)
        if token is not None:
            self.drafts.append(token)
        self.fed += 1

    def verified(self, results: TokenResults) -> int:
        """Greedy acceptance: how many drafts the full model's tokens (`results`, one per position b..b+k)
        agree with, in order. The full model's tokens up to the first disagreement (or all k + 1) are what
        the sequence emits."""
        full = results.tokens[: self.k].tolist()
        j = next((i for i, (x, y) in enumerate(zip(self.drafts, full, strict=True)) if x != y), self.k)
        self.drafted += self.k
        self.accepted += j
        return j
