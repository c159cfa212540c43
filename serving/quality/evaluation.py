"""Measures of early exit against full depth, through the real engine (every token exits where its policy
says, its deeper K/V back-filled as served): teacher-forced runs (agreement of each prediction with the
full model's, perplexity), free-running ones (greedy generations compared, and scored by the full model),
classification, and the layer compute a configuration uses. serving/quality/sweep.py sweeps settings with
them; calibration tunes the pack's defaults with them."""

from __future__ import annotations

import asyncio
import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

from serving.engine import Engine
from serving.engine.messages import Usage
from serving.engine.params import MAX_TOP_LOGPROBS, ExitParams
from serving.engine.plan import PipelinePlan
from workers.arch import ModelArch

# Free-running agreement: short chat prompts of the kind people send.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a black hole is in one paragraph.",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
]


@dataclass
class TeacherForced:
    predictions: torch.Tensor  # int64 [n]: greedy next-token prediction after each token, at its exit
    exit_layers: torch.Tensor  # int64 [n]
    target_logprobs: torch.Tensor  # float32 [n - windows]: log-probability of each actual next token
    scored: torch.Tensor  # bool [n]: positions with a next token in their window (target_logprobs' rows)


async def teacher_forced(
    engine: Engine,
    windows: list[list[int]],
    exit: ExitParams | dict | None = None,
    chunk: int = 128,
    exit_every: int = 1,
    exit_from: list[int] | None = None,
    as_prompt: bool = False,
) -> TeacherForced:
    """Every window through the engine teacher-forced (Engine.teacher_forced), results in window order."""
    per_window = await engine.teacher_forced(windows, exit, chunk, exit_every, exit_from, as_prompt)
    return TeacherForced(
        torch.cat([w.tokens for w in per_window]),
        torch.cat([w.exit_layer for w in per_window]),
        torch.cat([w.target_logprobs[:-1] for w in per_window]),  # the last token of a window has nothing to score
        torch.cat([torch.arange(len(w)) < len(w) - 1 for w in windows]),
    )


async def backfill_harm(
    engine: Engine,
    windows: list[list[int]],
    depths: list[int],
    modes: tuple[str, ...] = ("decoupled", "mapped"),
    every: int = 8,
) -> dict[str, dict[str, float]]:
    """Per back-fill mode and exit depth: how many later tokens' full-depth predictions a token that exits
    there changes, through the K/V its back-fill approximates. Every `every`-th token exits at the depth,
    the rest run at full depth, against a run where none exits."""  # fmt: skip
    full = await teacher_forced(engine, windows, {"policy": "none"})
    exits = torch.cat([torch.arange(len(w)) % every == 0 for w in windows])
    harm: dict[str, dict[str, float]] = {}
    for mode in modes:
        harm[mode] = {}
        for d in depths:
            tf = await teacher_forced(
                engine, windows, {"policy": "static", "max_depth": d, "backfill": mode}, 128, every
            )
            changed = (tf.predictions != full.predictions)[~exits].sum()
            harm[mode][str(d)] = round(float(changed) / float(exits.sum()), 4)
    return harm


LEARNED_THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]


def agreement(a: torch.Tensor | list[int], b: torch.Tensor | list[int]) -> float:
    """Fraction of positions where two token sequences agree (over the shorter length)."""
    n = min(len(a), len(b))
    if n == 0:
        return 1.0
    return float((torch.as_tensor(a[:n]) == torch.as_tensor(b[:n])).float().mean())


def common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens before two generations first differ."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def generate(
    engine: Engine,
    prompts: list[list[int]],
    max_tokens: int,
    exit: dict,
    temperature: float = 0.0,
    seeds: list[int | None] | None = None,
    ignore_eos: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[list[int]]:
    """A continuation of every prompt under `exit`: greedy, or sampled at `temperature` with request `seeds`
    (the same seed, the same continuation). All are submitted at once; the engine's scheduler batches them."""
    seeds = seeds or [None] * len(prompts)
    done = 0

    async def one(prompt: list[int], seed: int | None) -> list[int]:
        nonlocal done
        out: list[int] = []
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "ignore_eos": ignore_eos}
        async for item in engine.submit(prompt, sampling, exit):
            out += item.token_ids
        done += 1
        if progress and (done % 32 == 0 or done == len(prompts)):
            progress(f"generated {done}/{len(prompts)} continuations")
        return out

    return list(await asyncio.gather(*(one(p, s) for p, s in zip(prompts, seeds, strict=True))))


async def generate_greedy(engine: Engine, prompts: list[list[int]], max_tokens: int, exit: dict) -> list[list[int]]:
    """Greedy continuations of every prompt, exactly `max_tokens` each (free-running comparisons)."""
    return await generate(engine, prompts, max_tokens, exit, ignore_eos=True)


async def continuation_logprobs(
    engine: Engine, pairs: list[tuple[list[int], list[int]]], exit: ExitParams | dict | None = None
) -> list[float]:
    """The log-likelihood of each continuation after its context, teacher-forced (what echo scoring, as
    lm-evaluation-harness does it, reads from the server)."""
    per_window = await engine.teacher_forced([ctx + cont for ctx, cont in pairs], exit)
    # position i scores token i + 1: a continuation's tokens are scored from its context's last position on
    return [
        float(w.target_logprobs[len(ctx) - 1 : len(ctx) + len(cont) - 1].sum())
        for w, (ctx, cont) in zip(per_window, pairs, strict=True)
    ]


async def continuation_perplexity(engine: Engine, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """The full model's perplexity of continuations after their prompts: how likely the full model finds
    what a configuration generated."""
    pairs = list(zip(prompts, continuations, strict=True))
    total = await continuation_logprobs(engine, pairs, {"policy": "none"})
    return math.exp(-sum(total) / sum(map(len, continuations)))


def rouge_l(outputs: list[str], references: list[str]) -> float:
    """CALM's textual consistency: mean ROUGE-L F-measure of each output against its reference text."""
    from rouge_score import rouge_scorer  # here: it loads nltk, which only this measure needs

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(ref, out)["rougeL"].fmeasure for out, ref in zip(outputs, references, strict=True)]
    return round(sum(scores) / len(scores), 4) if scores else 1.0


@dataclass(frozen=True)
class Classification:
    """Labelled texts as a multiple-choice prompt: each text in a template, the label read from which
    choice's first token the model ranks higher after it (one greedy token with its top log-probabilities,
    as classification by generation does through the API). Choices' first tokens must differ."""

    prompts: list[list[int]]
    labels: list[int]
    choice_ids: list[int]

    @classmethod
    def of(cls, tokenizer, rows: list[tuple[str, int]], template: str, choices: list[str]) -> Classification:
        firsts = [tokenizer.encode(c, add_special_tokens=False)[0] for c in choices]
        if len(set(firsts)) != len(firsts):
            raise ValueError(f"the choices {choices} must start with different tokens")
        if any(not 0 <= label < len(choices) for _, label in rows):
            raise ValueError(f"labels must be indices into the {len(choices)} choices")
        prompts = [tokenizer.encode(template.format(text=t), add_special_tokens=False) for t, _ in rows]
        return cls(prompts, [label for _, label in rows], firsts)


async def classify(engine: Engine, task: Classification, exit: dict) -> dict:
    """Accuracy and prompt layers saved (back-fill counted) of `exit` on a classification task."""
    sampling = {"max_tokens": 1, "temperature": 0.0, "logprobs": MAX_TOP_LOGPROBS}

    async def one(prompt: list[int]) -> tuple[int, Usage]:
        outs = [o async for o in engine.submit(prompt, sampling, exit)]
        top = outs[0].top_logprobs[0]
        scores = [top.get(c, -math.inf) for c in task.choice_ids]
        return max(range(len(scores)), key=scores.__getitem__), outs[-1].usage

    results = await asyncio.gather(*(one(p) for p in task.prompts))
    usage = functools.reduce(operator.add, (u for _, u in results))
    skipped = 1 - usage.prompt_layers_computed / usage.prompt_layers_total
    backfill = engine.admission.resolve_exit(exit).prefill.backfill.name.lower()
    return {
        "accuracy": round(sum(p == y for (p, _), y in zip(results, task.labels, strict=True)) / len(results), 4),
        "prompt_compute_saved": round(skipped * (1 - skipped_cost(backfill, costs_of(engine))), 4),
    }


# ---- compute accounting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Per-token costs in units of one decoder layer's weight reads (what bounds decoding)."""

    kv: float  # a skipped layer's decoupled back-fill: its K/V projection
    map: float  # a skipped layer's mapped back-fill adds its map (low rank)
    head: float  # one exit head: the final norm and the LM head
    router: float  # one learned router

    @classmethod
    def of(cls, arch: ModelArch, map_rank: int, router_params: int) -> Costs:
        h = arch.hidden_size
        layer = h * arch.q_size * 2 + h * arch.kv_size * 2 + 3 * h * arch.intermediate_size
        return cls(2 * h * arch.kv_size / layer, 2 * h * map_rank / layer, arch.vocab_size * h / layer,
                   router_params / layer)  # fmt: skip


def costs_of(engine: Engine) -> Costs:
    """The cost units of an engine's model and exit pack (its maps' rank, its routers' size)."""
    pack = engine.pack
    map_rank = router_params = 0
    if pack is not None:
        map_rank = max((t.shape[0] for k, t in pack.tensors.items() if k.startswith("map.") and k.endswith(".down")),
                       default=0)  # fmt: skip
        router_params = max(
            (sum(t.numel() for t in pack.prefixed(f"router.{d}.").values()) for d in engine.plan.exit_points),
            default=0,
        )
    return Costs.of(engine.arch, map_rank, router_params)


def skipped_cost(backfill: str, costs: Costs) -> float:
    """What back-filling one skipped layer costs, in layers."""
    return {"exact": 1.0, "decoupled": costs.kv, "mapped": costs.kv + costs.map}[backfill]


def compute_used(
    depths: torch.Tensor,
    exit_points: list[int],
    num_layers: int,
    policy: str,
    backfill: str,
    min_depth: int,
    costs: Costs,
) -> tuple[float, float]:
    """(layer compute, exit-decision overhead), both as fractions of full depth's layer compute.

    Layer compute counts the layers each token ran plus the back-fill of the ones it skipped (exact: the
    whole layer; decoupled: its K/V projection; mapped: also its map). The overhead is what deciding costs
    beyond the one head every token needs to produce its token: confidence evaluates an exit head at
    each exit point it passes, learned a router."""  # fmt: skip
    d = depths.double()
    layers = float((d + (num_layers - d) * skipped_cost(backfill, costs)).mean()) / num_layers
    points = torch.tensor([p for p in exit_points if p >= min_depth], dtype=torch.float64)
    passed = (points[None, :] <= d[:, None]).sum(1).double()  # exit points evaluated, the exit included
    per_point = {"confidence": costs.head, "learned": costs.router}.get(policy, 0.0)
    extra = passed * per_point - (costs.head if policy == "confidence" else 0.0)
    return layers, float(extra.clamp(min=0).mean()) / num_layers


# ---- the sweep --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One configuration of the sweep; `head` names the exit heads: 'untrained' or 'adapted'."""

    policy: str
    backfill: str
    threshold: float | None = None
    max_depth: int | None = None
    head: str = "adapted"

    @property
    def curve(self) -> str:
        """The Pareto curve it belongs to."""
        name = f"confidence ({self.head})" if self.policy == "confidence" else self.policy
        return f"{name}, {self.backfill}"

    def exit(self) -> dict:
        e = {"policy": self.policy, "backfill": self.backfill}
        if self.threshold is not None:
            e["threshold"] = self.threshold
        if self.max_depth is not None:
            e["max_depth"] = self.max_depth
        return e


def setting_row(s: Setting, tf: TeacherForced, full: TeacherForced, plan: PipelinePlan, costs: Costs) -> dict:
    """A setting's figures on a teacher-forced run, against full depth's run on the same tokens."""
    layers, overhead = compute_used(
        tf.exit_layers, list(plan.exit_points), plan.num_layers, s.policy, s.backfill, plan.min_exit_depth, costs
    )
    return {
        "policy": s.policy,
        "head": s.head,
        "backfill": s.backfill,
        "threshold": s.threshold,
        "max_depth": s.max_depth,
        "curve": s.curve,
        "mean_exit_depth": round(float(tf.exit_layers.double().mean()), 3),
        "compute_saved": round(1.0 - layers, 4),
        "decision_overhead": round(overhead, 4),
        "agreement": round(agreement(tf.predictions, full.predictions), 4),
        "perplexity": round(math.exp(-float(tf.target_logprobs.mean())), 3),
    }


def oracle_row(
    static_exact: dict[int, TeacherForced],
    full: TeacherForced,
    num_layers: int,
    min_depth: int,
    backfill: str,
    costs: Costs,
) -> dict:
    """A perfect exit decision on the same heads: each token leaves at the shallowest exit point whose
    adapted head predicts the full model's token (read from the static runs with exact back-fill, whose
    caches are the full model's), else at full depth. Its compute is counted with `backfill`'s cost of a
    skipped layer; its perplexity is what the heads give there with exact caches (an approximate back-fill
    would do worse)."""
    depth = torch.full_like(full.predictions, num_layers)
    logp = full.target_logprobs.clone()
    for d in sorted(static_exact, reverse=True):  # shallower depths overwrite deeper ones
        tf = static_exact[d]
        hit = tf.predictions == full.predictions
        depth[hit] = d
        logp[hit[full.scored]] = tf.target_logprobs[hit[full.scored]]
    layers, _ = compute_used(depth, sorted(static_exact), num_layers, "oracle", backfill, min_depth, costs)
    return {
        "policy": "oracle",
        "head": "adapted",
        "backfill": backfill,
        "threshold": None,
        "max_depth": None,
        "curve": f"oracle, {backfill}",
        "mean_exit_depth": round(float(depth.double().mean()), 3),
        "compute_saved": round(1.0 - layers, 4),
        "decision_overhead": 0.0,
        "agreement": 1.0,
        "perplexity": round(math.exp(-float(logp.mean())), 3),
    }
