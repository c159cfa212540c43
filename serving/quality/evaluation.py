"""Quality of early exit against full depth, through the real engine (every token exits where its policy
says, its deeper K/V back-filled as served): teacher-forced over held-out text (agreement of each
prediction with the full model's, perplexity) and free-running (greedy generations compared), swept over
policies, back-fill modes and thresholds, with the layer compute each configuration saves."""

from __future__ import annotations

import asyncio
import functools
import math
import operator
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.engine.messages import Usage
from serving.engine.params import MAX_TOP_LOGPROBS, ExitParams
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
) -> TeacherForced:
    """Every window through the engine teacher-forced (Engine.teacher_forced), results in window order."""
    per_window = await engine.teacher_forced(windows, exit, chunk, exit_every)
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


async def generate_greedy(engine: Engine, prompts: list[list[int]], max_tokens: int, exit: dict) -> list[list[int]]:
    """Greedy continuations of every prompt, run concurrently (batched by the engine's scheduler)."""

    async def one(prompt: list[int]) -> list[int]:
        out: list[int] = []
        sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        async for item in engine.submit(prompt, sampling, exit):
            out += item.token_ids
        return out

    return list(await asyncio.gather(*(one(p) for p in prompts)))


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


def sweep(
    exit_points: list[int],
    num_layers: int,
    policies: list[str],
    backfills: list[str],
    confidence_thresholds: list[float],
    learned_thresholds: list[float],
) -> list[Setting]:
    settings = []
    for b in backfills:
        if "static" in policies:
            settings += [Setting("static", b, max_depth=d) for d in exit_points if d < num_layers]
        if "confidence-untrained" in policies:
            settings += [Setting("confidence", b, t, head="untrained") for t in confidence_thresholds]
        if "confidence" in policies:
            settings += [Setting("confidence", b, t) for t in confidence_thresholds]
        if "learned" in policies:
            settings += [Setting("learned", b, t) for t in learned_thresholds]
    return settings


async def evaluate(
    config: EngineConfig,
    windows: list[list[int]],
    chats: list[list[dict[str, str]]],
    chat_tokens: int,
    settings: list[Setting],
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Every setting's row, and the full model's reference figures. Free-running quality: each setting's
    greedy continuations of the chat prompts, against full depth's (agreement, common prefix) and as the
    full model's perplexity of them (full depth's own continuations are the reference). Two engines: one
    with the exit pack (adapted heads, routers, maps) and one without it (the untrained heads)."""
    engines = {"adapted": Engine.local(config)}
    if any(s.head == "untrained" for s in settings):  # the same exit points, without the pack
        points = list(engines["adapted"].plan.exit_points)
        engines["untrained"] = Engine.local(config.model_copy(update={"exit_pack": "none", "exit_points": points}))
    try:
        engine = engines["adapted"]
        chat_ids = [engine.chat_prompt(messages) for messages in chats]
        plan = engine.plan
        costs = costs_of(engine)
        progress(f"full depth on {sum(map(len, windows))} held-out tokens")
        full = await teacher_forced(engine, windows, {"policy": "none"})
        full_chat = await generate_greedy(engine, chat_ids, chat_tokens, {"policy": "none"})
        reference = {
            "perplexity": round(math.exp(-float(full.target_logprobs.mean())), 3),
            "tokens": int(full.predictions.numel()),
        }
        if chat_ids:
            reference["chat_prompts"] = len(chat_ids)
            reference["free_running_perplexity"] = round(await continuation_perplexity(engine, chat_ids, full_chat), 3)
        rows = []
        static_exact: dict[int, TeacherForced] = {}  # per depth: what the adapted heads predict there
        for i, s in enumerate(settings):
            e = engines[s.head]
            tf = await teacher_forced(e, windows, s.exit())
            if (s.policy, s.backfill, s.head) == ("static", "exact", "adapted"):
                static_exact[s.max_depth] = tf
            layers, overhead = compute_used(
                tf.exit_layers, list(plan.exit_points), plan.num_layers, s.policy, s.backfill,
                plan.min_exit_depth, costs,
            )  # fmt: skip
            row = {
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
            if chat_ids:
                out = await generate_greedy(e, chat_ids, chat_tokens, s.exit())
                row["free_running_agreement"] = round(
                    statistics.fmean(agreement(a, b) for a, b in zip(out, full_chat, strict=True)), 4
                )
                row["free_running_common_prefix"] = round(
                    statistics.fmean(common_prefix(a, b) for a, b in zip(out, full_chat, strict=True)), 2
                )
                row["free_running_perplexity"] = round(await continuation_perplexity(engine, chat_ids, out), 3)
            rows.append(row)
            progress(
                f"[{i + 1}/{len(settings)}] {s.curve} {_knob(row)}: depth {row['mean_exit_depth']:.1f}, saved "
                f"{row['compute_saved']:.1%}, agreement {row['agreement']:.1%}, perplexity {row['perplexity']:.2f}"
            )
        backfills = dict.fromkeys(s.backfill for s in settings if s.backfill != "exact")
        if static_exact and set(static_exact) >= {d for d in plan.exit_points if d < plan.num_layers}:
            rows += [oracle_row(static_exact, full, plan.num_layers, plan.min_exit_depth, b, costs) for b in backfills]
    finally:
        for e in engines.values():
            await e.shutdown()
    return {"full": reference, "rows": rows, "at_agreement": at_agreement(rows, (0.95, 0.99))}


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


def _knob(row: dict) -> str:
    if row["policy"] == "oracle":
        return "perfect"
    return f"depth {row['max_depth']}" if row["max_depth"] is not None else f"threshold {row['threshold']}"


def at_agreement(rows: list[dict], targets: tuple[float, ...]) -> dict:
    """Per curve and target agreement: the most compute saved by a setting that reaches it, with its
    perplexity (None where no setting reaches it)."""
    out: dict = {}
    for target in targets:
        key = f"{target:.2f}"
        out[key] = {}
        for curve in dict.fromkeys(r["curve"] for r in rows):
            ok = [r for r in rows if r["curve"] == curve and r["agreement"] >= target]
            best = max(ok, key=lambda r: r["compute_saved"], default=None)
            out[key][curve] = (
                None
                if best is None
                else {k: best[k] for k in ("compute_saved", "agreement", "perplexity", "threshold", "max_depth")}
            )
    return out


def table(report: dict) -> str:
    """The sweep as a text table, then compute saved at 95% and 99% agreement per curve."""
    lines = [f"full depth: perplexity {report['full']['perplexity']:.3f} on {report['full']['tokens']} tokens", ""]
    header = f"{'curve':<36} {'setting':>14} {'depth':>6} {'saved':>7} {'overhead':>8} {'agree':>7} {'ppl':>8}"
    lines += [header, "-" * len(header)]
    for r in report["rows"]:
        lines.append(
            f"{r['curve']:<36} {_knob(r):>14} {r['mean_exit_depth']:>6.2f} {r['compute_saved']:>7.1%} "
            f"{r['decision_overhead']:>8.1%} {r['agreement']:>7.1%} {r['perplexity']:>8.3f}"
        )
    for target, curves in report["at_agreement"].items():
        lines += ["", f"most compute saved at >= {float(target):.0%} agreement:"]
        for curve, best in curves.items():
            lines.append(f"  {curve:<36} " + ("-" if best is None else
                         f"{best['compute_saved']:.1%} (perplexity {best['perplexity']:.3f})"))  # fmt: skip
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Pareto curves: compute saved against agreement, one curve per policy and back-fill mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'adept-serve[eval]'") from e
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"exact": ":", "decoupled": "-", "mapped": "--"}  # line style: back-fill; colour: policy
    policies = dict.fromkeys(r["curve"].rsplit(", ", 1)[0] for r in report["rows"])
    colours = dict(zip(policies, plt.cm.tab10.colors, strict=False))
    for curve in dict.fromkeys(r["curve"] for r in report["rows"]):
        points = sorted((r["compute_saved"], r["agreement"]) for r in report["rows"] if r["curve"] == curve)
        policy, backfill = curve.rsplit(", ", 1)
        ax.plot(*zip(*points, strict=True), styles.get(backfill, "-"), color=colours[policy], marker="o",
                markersize=3, label=curve)  # fmt: skip
    for target in (0.95, 0.99):
        ax.axhline(target, color="grey", linewidth=0.6)
    ax.set_ylim(top=1.0)
    ax.set_xlabel("layer compute saved (back-fill counted; exact back-fill saves none)")
    ax.set_ylabel("teacher-forced agreement with the full model")
    ax.set_title(f"{report.get('model', '')}: early exit, quality against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
