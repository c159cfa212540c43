"""Self-speculative decoding: the exit head at the draft depth drafts the next tokens, the deeper layer
groups verify them in one pass, and the full model's tokens are what a request gets (LayerSkip, Draft &
Verify). Lossless: greedy output is full depth's token for token.

A round of one sequence, whose next token t (the full model's) is unfed at position b:
- draft: t, then each drafted token, run through the layers up to the draft depth D (one row a step, beside
  the other sequences' rows); the exit head at D (the pack's where it has one there, else the identity)
  drafts x1..xk, and the K/V of layers below D is written as full depth would write it. A last step feeds
  xk (no head) so that every position has its hidden state at D. A draft the head gives less than
  `min_confidence` ends the round before it (Kangaroo, AdaEDL): it is dropped, and what was fed is verified.
- verify: positions b..b+k enter the group that holds layer D + 1, at that layer, with those hidden states
  and run the remaining layers in one call per group; position b+i's token y(i+1) checks x(i+1). The
  longest agreeing prefix is kept, plus the full model's next token (a correction, or a bonus when all k
  agree).
- roll back: the rejected positions' K/V is forgotten in every group (per position: the cache's fill map
  must not vouch for stale K/V), and the next round starts at the first unverified token.

Sampled requests speculate too, and stay exact: a draft samples from the exit head's distribution with the
noise the full model's token at the same position samples with (workers/sampling.py: an exponential race
seeded by request seed and position; Gumbel-max coupling, as in "coupling without communication"). The full
model's token is then exactly the one plain decoding would emit for that seed, and a draft is kept when it
is that token, as for greedy. This stands in for Leviathan et al.'s rejection rule: both follow full depth's
distribution exactly; this one also keeps a seeded request's text independent of its rounds and batches and
sends no distributions between groups, and keeps a draft with probability at least (1 - TV) / (1 + TV)
against the rule's 1 - TV (TV: the total-variation distance between the two distributions; equal when
they are).

When drafting does not pay it steps aside, per sequence: from the acceptance it measured (over about the
last 20 drafts, evidence aging also while it decodes plainly) and a cost model of a round (`RoundCost`),
each round drafts as many tokens as maximise the expected speed-up, none if no count beats plain decoding
(while every draft of the last round was kept and
the acceptance half a standard deviation up would pay, it measures on with short rounds). It then decodes
plainly, probing again with a short round after a back-off that doubles while drafting still does not pay.
With more sequences running than `speculative_max_batch` (the engine is compute-bound there; by default 1
on a CPU, 8 on a GPU) every sequence decodes plainly.

Scheduler and engine know rounds only through `SpecState`; the layer groups know drafts only as rows whose
back-fill mode is DRAFT (they stop at D, write no K/V past it and hand back their hidden state)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.engine.exceptions import RequestError
from serving.engine.params import ResolvedExit
from workers.arch import ModelArch
from workers.modes import Backfill, Policy
from workers.protocol import GroupSpec, TokenResults

MAX_SPECULATIVE_TOKENS = 16
# Each verified position past the first, as a share of verifying one (benchmarks/spec_speed.py's cost model:
# 5 positions through the default model's last 10 layers and LM head cost 1.69x one on a 2-core CPU, 9 cost
# 2.34x; on a GPU at small batch they are nearly free).
EXTRA_ROW_COST = {"cpu": 0.17, "cuda": 0.02}
# The LM head's time against its share of weight reads: on the CPU it runs as a multi-threaded GEMM
# (workers.layers.head_logits), 3.7 ms for the default model's head against 1.16 ms a layer: 3.2 layers, not 8.
HEAD_SHARE = {"cpu": 0.4}
PROBE_TOKENS = 1  # drafts of a round that measures acceptance again after stepping aside (cheap: one)
MAX_BATCH = {"cpu": 1}  # speculative_max_batch by device (default 8): on a CPU extra rows are not free
FIRST_BACKOFF = 32  # plain tokens before that round; doubled each time drafting still does not pay
MAX_BACKOFF = 256
DECAY = 0.95  # per draft compared and per plain step: the measured acceptance weighs about the last 20
PRIOR = (0.5, 1.0)  # acceptance before any evidence: successes, trials
EXPLORE = 0.5  # standard deviations of optimism that keep a sequence measuring after a round kept whole


class SpeculativeParams(BaseModel):
    """Speculative decoding of one request, or the server's default (`engine.speculative`)."""

    model_config = ConfigDict(extra="forbid")

    num_tokens: int = Field(0, ge=0, le=MAX_SPECULATIVE_TOKENS, description="tokens drafted per round at most; 0: off")
    draft_depth: int | Literal["auto"] = Field(
        "auto",
        description="layers the drafts run (1 to the model's depth - 1); 'auto': the exit point where the exit "
        "pack's measured agreement promises the most speed-up (without a pack: the deepest below the last layer)",
    )
    min_confidence: float = Field(
        0.0, ge=0.0, le=1.0, description="a round stops drafting at a draft its head gives less probability; 0: never"
    )

    @field_validator("draft_depth", mode="before")
    @classmethod
    def _depth_or_auto(cls, v: object) -> object:
        """Named as the field itself when wrong, not as one member of its union."""
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool)):
            return v
        if isinstance(v, str) and v.strip().isdigit():  # environment variables, flags
            return int(v)
        raise ValueError("must be a depth (an integer) or 'auto'")


@dataclass(frozen=True)
class RoundCost:
    """What a round costs, in layers' worth of one position's weight reads (decoding at small batches is
    bound by reading weights; on the CPU the head is cheaper, HEAD_SHARE): a decoder layer 1, the LM head
    `head`, the drafts' head (over the draft vocabulary) `draft_head`; verifying n positions costs one's
    (1 + extra_row (n - 1)) times."""

    layers: int
    depth: int
    head: float
    extra_row: float
    draft_head: float | None = None  # None: the whole head

    @classmethod
    def of(cls, arch: ModelArch, depth: int, device: str, draft_vocab: int | None = None) -> RoundCost:
        h, i = arch.hidden_size, arch.intermediate_size
        layer = 2 * arch.q_size * h + 2 * arch.kv_size * h + 3 * h * i
        head = arch.vocab_size * h / layer * HEAD_SHARE.get(device, 1.0)
        draft = head * min(draft_vocab or arch.vocab_size, arch.vocab_size) / arch.vocab_size
        return cls(arch.num_layers, depth, head, EXTRA_ROW_COST.get(device, 0.0), draft)

    @property
    def full(self) -> float:
        """One plain step: every layer and the LM head."""
        return self.layers + self.head

    def round(self, k: int) -> float:
        """k drafts (each to the draft depth, with the exit head), the last one fed, k + 1 positions verified."""
        verify = (self.layers - self.depth + self.head) * (1 + self.extra_row * k)
        draft_head = self.head if self.draft_head is None else self.draft_head
        return k * (self.depth + draft_head) + self.depth + verify

    def speedup(self, acceptance: float, k: int) -> float:
        """Expected tokens per unit cost against plain decoding, each draft kept with probability `acceptance`."""
        return sum(acceptance**i for i in range(k + 1)) * self.full / self.round(k)

    def best(self, acceptance: float, most: int) -> int:
        """The draft count that maximises the expected speed-up; 0 when none beats plain decoding."""
        k = max(range(1, most + 1), key=lambda n: self.speedup(acceptance, n), default=0)
        return k if k and self.speedup(acceptance, k) > 1 else 0

    def break_even(self, k: int) -> float | None:
        """The acceptance at which k drafts a round pay for themselves; None if even all kept do not."""
        return break_even_acceptance(k, self.round(k) / self.full)


@dataclass(frozen=True)
class SpecConfig:
    """A request's resolved speculative mode: drafts per round at most, their depth, the group verification
    enters (the one holding layer depth + 1), the cost model that decides how many drafts pay (None: always
    the most), and the confidence below which a round stops drafting."""

    num_tokens: int
    depth: int
    group: int
    cost: RoundCost | None = None
    min_confidence: float = 0.0

    @property
    def draft_exit(self) -> ResolvedExit:
        return ResolvedExit(Policy.STATIC, 0.0, 1, self.depth, Backfill.DRAFT)


def draft_depths(exit_points: tuple[int, ...], num_layers: int) -> list[int]:
    """The depths where drafts have exit heads to come from (any depth below the last layer is accepted; the
    identity head where the pack has none): the exit points below the last layer."""
    return [d for d in exit_points if d < num_layers] or [max(1, num_layers // 2)]


def auto_depth(
    num_tokens: int, depths: list[int], agreement: dict[int, float], cost_of: Callable[[int], RoundCost]
) -> int:
    """'auto': of the depths with a measured agreement (the exit pack's validation figures: how often its head
    there predicts full depth's token), the one whose best draft count promises the most expected speed-up
    by the cost model; without figures, the deepest of `depths`."""
    if not agreement:
        return depths[-1]

    def promise(d: int) -> float:
        cost = cost_of(d)
        return max(cost.speedup(agreement[d], k) for k in range(1, num_tokens + 1))

    return max(sorted(agreement), key=promise)


def resolve_speculative(
    request: SpeculativeParams | dict | None,
    default: SpeculativeParams,
    groups: tuple[GroupSpec, ...],
    auto: Callable[[int], int],
) -> SpecConfig | None:
    """A request's speculative mode (the fields it leaves unset: the server's default), checked against the
    model's depth; `auto(num_tokens)` resolves draft_depth 'auto'. None when off."""
    if request is None:
        params = default
    else:
        given = request if isinstance(request, SpeculativeParams) else SpeculativeParams.model_validate(request)
        params = default.model_copy(update=given.model_dump(exclude_unset=True))
    if params.num_tokens == 0:
        return None
    num_layers = groups[-1].end
    depth = auto(params.num_tokens) if params.draft_depth == "auto" else params.draft_depth
    if not 0 < depth < num_layers:
        raise RequestError(
            "adept.speculative.draft_depth",
            f"{depth} is not a depth a draft can stop at: pick one from 1 to {num_layers - 1} or 'auto'",
        )
    group = next(i for i, g in enumerate(groups) if g.start <= depth < g.end)
    return SpecConfig(params.num_tokens, depth, group, min_confidence=params.min_confidence)


def check_default(default: SpeculativeParams, groups: tuple[GroupSpec, ...]) -> None:
    """A server default no request could use is a configuration error: raise it as one."""
    try:
        resolve_speculative(None, default, groups, lambda _: 1)
    except RequestError as e:
        raise ValueError(f"engine.speculative{e.param.removeprefix('adept.speculative')}: {e.message}") from None


def break_even_acceptance(k: int, steps: float) -> float | None:
    """The per-draft acceptance a at which a round of k drafts, costing `steps` plain steps, yields as many
    tokens as plain decoding ((1 - a^(k+1)) / (1 - a) = steps); None if even all kept do not pay."""
    if steps >= k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid**i for i in range(k + 1)) < steps else (lo, mid)
    return hi


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
    successes: float = 0.0  # drafts kept, and drafts compared (the first rejected one included), decayed
    trials: float = 0.0
    wait: int = 1  # plain steps before the next probe round (1: the first round probes)
    backoff: int = FIRST_BACKOFF
    kept_all: bool = False  # the last round kept every draft

    @property
    def drafting(self) -> bool:
        return self.k > 0 and self.fed <= self.k

    @property
    def verifying(self) -> bool:
        """Every position of the round is fed (k may have dropped to 0: the first draft was not confident)."""
        return self.fed > 0 and self.fed == self.k + 1

    @property
    def acceptance(self) -> float:
        """The measured chance that a draft is kept."""
        return (self.successes + PRIOR[0]) / (self.trials + PRIOR[1])

    @property
    def optimistic(self) -> float:
        """The measured chance EXPLORE standard deviations (its Beta posterior's) up: what it may still be."""
        a, n = self.acceptance, self.trials + PRIOR[1]
        return min(1.0, a + EXPLORE * (a * (1 - a) / (n + 1)) ** 0.5)

    def start(self, room: int, crowded: bool = False) -> None:
        """A new round with at most `room` drafts, as many as pay (0: this step decodes plainly, at full
        depth); `crowded`: the engine is compute-bound, no drafts."""
        self.fed, self.drafts, self.hidden = 0, [], []
        most, cost = min(self.config.num_tokens, max(room, 0)), self.config.cost
        if most == 0 or crowded:
            self.k = 0
        elif cost is None:
            self.k = most
        elif self.wait > 0:  # stepped aside: plain steps, then a short round to measure again
            self.wait -= 1
            self.successes, self.trials = DECAY * self.successes, DECAY * self.trials  # evidence ages
            self.k = 0 if self.wait else min(PROBE_TOKENS, most)
        else:
            self.k = cost.best(self.acceptance, most)
            if self.k == 0 and self.kept_all and cost.best(self.optimistic, most):  # all kept, it may pay: measure on
                self.k = min(PROBE_TOKENS, most)
            elif self.k == 0:
                self.wait, self.backoff = self.backoff, min(2 * self.backoff, MAX_BACKOFF)
            else:
                self.backoff = FIRST_BACKOFF

    def reset(self) -> None:
        """Drafts discarded (preempted, or the K/V rebuilt): the next round starts afresh."""
        self.k, self.fed, self.drafts, self.hidden = 0, 0, [], []

    def input_token(self, next_token: int) -> int:
        """The token the next draft step feeds: the round's first (the full model's) or the last draft."""
        return next_token if self.fed == 0 else self.drafts[self.fed - 1]

    def fed_one(self, hidden: torch.Tensor, token: int | None, confidence: float = 1.0) -> None:
        """A draft step's result: the fed position's hidden state at the draft depth and the draft it gave
        (None: the last step, which only feeds). A draft below min_confidence ends the round without it."""
        self.hidden.append(hidden)
        self.fed += 1
        if token is None:
            return
        if confidence < self.config.min_confidence:
            self.k = len(self.drafts)
        else:
            self.drafts.append(token)

    def verified(self, results: TokenResults) -> int:
        """How many drafts the full model's tokens (`results`, one per position b..b+k; sampled with the
        drafts' noise) agree with, in order. The full model's tokens up to the first disagreement (or all
        k + 1) are what the sequence emits."""
        full = results.tokens[: self.k].tolist()
        j = next((i for i, (x, y) in enumerate(zip(self.drafts, full, strict=True)) if x != y), self.k)
        if self.k == 0:  # no confident draft: nothing measured
            return 0
        self.drafted += self.k
        self.accepted += j
        compared = j + (j < self.k)
        self.successes = DECAY**compared * self.successes + j
        self.trials = DECAY**compared * self.trials + compared
        self.kept_all = j == self.k
        return j
