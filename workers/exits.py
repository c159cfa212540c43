"""Exit heads and exit decisions.

An exit head at depth d: adapter_d (identity until calibration trains one) -> the model's final norm ->
the shared LM head. A policy decides, per row, whether the row stops at d."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from workers.exit_pack import PROMPT_PREFIX, ExitPack, ExitPackError
from workers.layers import head_logits, rms_norm
from workers.modes import Backfill, Policy
from workers.protocol import Rows


@dataclass
class Adapter:
    """Residual map h + W h + b, with W full (weight) or low rank (up @ down), plus for an MLP head
    rms(h) * w2 gelu(w1 h / rms(h) + b1): scaled with h, since the final norm after it drops h's scale."""

    weight: torch.Tensor | None = None
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    w1: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    eps: float = 1e-6

    @property
    def kind(self) -> str:
        return "mlp" if self.w1 is not None else "linear" if self.weight is not None else "low_rank"

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            out = h + F.linear(h, self.weight)
        elif self.down is not None:
            out = h + F.linear(F.linear(h, self.down), self.up)
        else:
            out = h
        if self.w1 is not None:
            scale = h.pow(2).mean(-1, keepdim=True).add(self.eps).sqrt()
            out = out + scale * F.linear(F.gelu(F.linear(h / scale, self.w1, self.b1)), self.w2)
        return out if self.bias is None else out + self.bias


class ExitRouter(Protocol):
    """A trained router at one exit point: per row, the probability that exiting there keeps the full
    model's token. `confidence` is [rows, 3] (top probability, top-2 margin, entropy) of the exit head,
    computed only when the router asks for it (it costs an LM head)."""

    uses_confidence: bool

    def __call__(self, hidden: torch.Tensor, confidence: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class MLPRouter:
    """Two-layer router on the exit hidden state (normalized), plus the head's confidence features if asked."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    eps: float
    uses_confidence: bool = False

    def __call__(self, hidden: torch.Tensor, confidence: torch.Tensor | None) -> torch.Tensor:
        x = rms_norm(hidden, None, self.eps).float()
        if self.uses_confidence:
            x = torch.cat([x, confidence.float()], dim=-1)
        return torch.sigmoid(F.linear(F.gelu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)).squeeze(-1)


@dataclass
class ExitCost:
    """The cost-aware exit decision of policy `learned`. At depth d a router gives p, the probability that
    the exit keeps the full model's token. Exiting risks that token, 1 - p, plus the harm its back-filled
    K/V do to later tokens, h (expected later tokens changed; per back-fill mode and depth, measured at
    calibration; none for exact). Staying, when the token was already right, wastes the layers left:
    p * w with w = ((L - d) / L) ** weight. The score p w / (p w + 1 - p + h) is 1/2 where the two balance;
    a request's threshold t exits when staying wastes t / (1 - t) times what exiting risks, so one trained
    router serves every trade-off."""

    num_layers: int
    weight: float = 1.0
    harm: dict[str, dict[int, float]] = field(default_factory=dict)  # back-fill mode -> depth -> harm
    _tables: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_manifest(cls, num_layers: int, cost: dict) -> ExitCost:
        harm = {
            mode: {int(d): float(v) for d, v in by_depth.items()} for mode, by_depth in cost.get("harm", {}).items()
        }
        return cls(num_layers, float(cost.get("weight", 1.0)), harm)

    def score(self, p: torch.Tensor, depth: int, backfill: torch.Tensor) -> torch.Tensor:
        w = ((self.num_layers - depth) / self.num_layers) ** self.weight
        harm = self._harm_at(depth, p.device)[backfill]
        return p * w / (p * w + 1 - p + harm)

    def _harm_at(self, depth: int, device: torch.device) -> torch.Tensor:
        """Harm per back-fill mode (indexed by Backfill) at `depth`: one lookup per decision, not one
        masked write per mode."""
        key = (depth, device)
        if key not in self._tables:
            harm = [self.harm.get(mode.name.lower(), {}).get(depth, 0.0) for mode in Backfill]
            self._tables[key] = torch.tensor(harm, dtype=torch.float32, device=device)
        return self._tables[key]


def confidence_features(logits: torch.Tensor) -> torch.Tensor:
    """[rows, 3]: top probability, margin between the top two, entropy (nats)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top2 = logp.topk(2, dim=-1).values.exp()
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], entropy], dim=-1)


@dataclass
class Phase:
    """The exit heads (adapters) and routers of one phase, per exit point."""

    adapters: dict[int, Adapter] = field(default_factory=dict)
    routers: dict[int, ExitRouter] = field(default_factory=dict)

    @classmethod
    def from_pack(cls, pack: ExitPack, prefix: str, points: list[int], eps: float, dtype, device) -> Phase:
        phase = cls()
        for d in points:
            t = {k: v.to(device, dtype) for k, v in pack.prefixed(f"{prefix}adapter.{d}.").items()}
            if t:
                phase.adapters[d] = Adapter(**t, eps=eps)
            r = {k: v.to(device, torch.float32) for k, v in pack.prefixed(f"{prefix}router.{d}.").items()}
            if r:
                phase.routers[d] = MLPRouter(**r, eps=eps, uses_confidence="confidence" in pack.router_features)
        return phase


class ExitHead:
    """The exit heads of one layer group: shared final norm and LM head, per exit point an adapter and a
    router for generated tokens and, where the pack has them, others for prompt tokens (`Rows.prompt`)."""

    def __init__(
        self, norm: torch.Tensor, lm_head: torch.Tensor, eps: float, decode: Phase, prompt: Phase, cost: ExitCost
    ) -> None:
        self.norm, self.lm_head, self.eps = norm, lm_head, eps
        self.decode, self.prompt, self.cost = decode, prompt, cost

    @classmethod
    def build(
        cls,
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        eps: float,
        num_layers: int,
        points: list[int],
        pack: ExitPack | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> ExitHead:
        if pack is None:
            return cls(norm, lm_head, eps, Phase(), Phase(), ExitCost(num_layers))
        decode = Phase.from_pack(pack, "", points, eps, dtype, device)
        prompt = Phase.from_pack(pack, PROMPT_PREFIX, points, eps, dtype, device)
        cost = ExitCost.from_manifest(num_layers, pack.manifest.get("router", {}).get("cost", {}))
        return cls(norm, lm_head, eps, decode, prompt, cost)

    def logits(self, h: torch.Tensor, depth: int, prompt: torch.Tensor) -> torch.Tensor:
        return self.project(self.adapt(h, depth, prompt))

    def adapt(
        self, h: torch.Tensor, depth: int, prompt: torch.Tensor, phases: tuple[bool, bool] | None = None
    ) -> torch.Tensor:
        """The exit point's adapter of each row's phase (identity where there is none); prompt rows take
        the generated tokens' adapter where the pack has none of their own. `phases`: whether any row is a
        prompt's and any a generated token's, if the caller knows (else one host sync finds out)."""
        decode, first = self.decode.adapters.get(depth), self.prompt.adapters.get(depth)
        if first is None:
            return h if decode is None else decode(h)
        has_prompt, has_decode = phases or _phases(prompt)
        out = h if decode is None or not has_decode else decode(h)
        if not has_prompt:
            return out
        return first(h) if not has_decode else torch.where(prompt[:, None], first(h), out)

    def router(
        self, depth: int, h: torch.Tensor, prompt: torch.Tensor, features: torch.Tensor | None,
        phases: tuple[bool, bool] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """p per row from its phase's router at `depth` (the generated tokens' where prompts have none)."""
        decode, first = self.decode.routers.get(depth), self.prompt.routers.get(depth)
        if decode is None or first is None:
            return (decode or first)(h, features)
        has_prompt, has_decode = phases or _phases(prompt)
        if not (has_prompt and has_decode):
            return (first if has_prompt else decode)(h, features)
        return torch.where(prompt, first(h, features), decode(h, features))

    def project(self, h: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        """Final norm and LM head (over the first `vocab` token ids only, if given): one call weighs as much
        as several decoder layers (the whole vocabulary's weights), whatever the rows, so callers gather rows
        from several exit points into one."""
        head = self.lm_head if vocab is None else self.lm_head[:vocab]
        return head_logits(rms_norm(h, self.norm, self.eps), head).float()

    def decide(
        self, depth: int, is_last: bool, h: torch.Tensor, rows: Rows
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Which rows exit at `depth`. Returns (exit mask, mask of rows whose logits were computed, those
        logits) so that sampling reuses the logits a confidence decision already paid for."""
        n = len(rows)
        has_logits = torch.zeros(n, dtype=torch.bool, device=h.device)
        if is_last:
            return torch.ones(n, dtype=torch.bool, device=h.device), has_logits, None
        policy = rows.policy
        exit_ = (policy != Policy.NONE) & (depth >= rows.max_depth)
        open_ = (depth >= rows.min_depth) & ~exit_
        conf = (policy == Policy.CONFIDENCE) & open_
        learned = (policy == Policy.LEARNED) & open_
        # one host sync for every branch below
        flags = torch.stack([conf.any(), learned.any(), rows.prompt.any(), (~rows.prompt).any()]).tolist()
        any_conf, any_learned, phases = flags[0], flags[1], (flags[2], flags[3])
        router = self.decode.routers.get(depth) or self.prompt.routers.get(depth)
        if any_learned and router is None:
            raise ExitPackError(f"exit policy 'learned' needs a router at exit point {depth}: load an exit pack")
        if any_learned and router.uses_confidence:
            conf, any_conf = conf | learned, True
        logits = None
        if any_conf:
            has_logits = conf
            logits = self.logits(h[conf], depth, rows.prompt[conf])
            probs_max = torch.softmax(logits, dim=-1).max(dim=-1).values
            hit = torch.zeros(n, dtype=torch.bool, device=h.device)
            hit[conf] = probs_max >= rows.threshold[conf]
            exit_ |= hit & (policy == Policy.CONFIDENCE)
        if any_learned:
            features = None
            if router.uses_confidence:
                features = torch.zeros(n, 3, device=h.device)
                features[conf] = confidence_features(logits)
            # Every row through the router (a few small products) rather than gathering the learned ones:
            # at decode batch sizes the indexing costs more than the rows it saves.
            scores = self.cost.score(self.router(depth, h, rows.prompt, features, phases), depth, rows.backfill)
            exit_ |= learned & (scores >= rows.threshold)
        return exit_, has_logits, logits


def _phases(prompt: torch.Tensor) -> tuple[bool, bool]:
    """(any prompt row, any generated token's row), in one host sync."""
    has_prompt, has_decode = torch.stack([prompt.any(), (~prompt).any()]).tolist()
    return has_prompt, has_decode
