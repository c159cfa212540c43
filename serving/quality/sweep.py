"""`adept eval`'s sweep: exit policies, back-fill modes and thresholds through the real engine, each
setting's row of quality against compute on held-out text and chat prompts (serving/quality/evaluation.py's
measures), on the model's own continuations of those prompts (serving/quality/continuations.py), the
oracle, and the report as a table and a Pareto plot."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.quality import continuations
from serving.quality.evaluation import (
    Setting,
    TeacherForced,
    agreement,
    common_prefix,
    continuation_perplexity,
    costs_of,
    generate_greedy,
    oracle_row,
    rouge_l,
    setting_row,
    teacher_forced,
)


def settings(
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
    continuation_tokens: int = 0,
) -> dict:
    """Every setting's row, and the full model's reference figures. Free-running quality: each setting's
    greedy continuations of the chat prompts, against full depth's (agreement, common prefix, ROUGE-L of
    the text) and as the full model's perplexity of them (full depth's own continuations are the
    reference). With `continuation_tokens`, the same settings and every exit head also on full depth's
    greedy continuations of the chat prompts, teacher-forced (serving/quality/continuations.py). Two
    engines: one with the exit pack (adapted heads, routers, maps) and one without it (the untrained heads)."""
    engines = {"adapted": Engine.local(config)}
    served = bool(chats and continuation_tokens)
    if served or any(s.head == "untrained" for s in settings):  # the same exit points, without the pack
        points = list(engines["adapted"].plan.exit_points)
        engines["untrained"] = Engine.local(config.model_copy(update={"exit_pack": "none", "exit_points": points}))
    try:
        engine = engines["adapted"]
        chat_ids = [engine.chat_prompt(messages) for messages in chats]
        free_ids = chat_ids if chat_tokens else []  # the free-running figures' prompts
        plan = engine.plan
        costs = costs_of(engine)
        progress(f"full depth on {sum(map(len, windows))} held-out tokens")
        full = await teacher_forced(engine, windows, {"policy": "none"})
        full_chat = await generate_greedy(engine, free_ids, chat_tokens, {"policy": "none"})
        reference = {
            "perplexity": round(math.exp(-float(full.target_logprobs.mean())), 3),
            "tokens": int(full.predictions.numel()),
        }
        if free_ids:
            reference["chat_prompts"] = len(free_ids)
            reference["free_running_perplexity"] = round(await continuation_perplexity(engine, free_ids, full_chat), 3)
        decode = functools.partial(engine.tokenizer.batch_decode, skip_special_tokens=True)
        rows = []
        static_exact: dict[int, TeacherForced] = {}  # per depth: what the adapted heads predict there
        for i, s in enumerate(settings):
            e = engines[s.head]
            tf = await teacher_forced(e, windows, s.exit())
            if (s.policy, s.backfill, s.head) == ("static", "exact", "adapted"):
                static_exact[s.max_depth] = tf
            row = setting_row(s, tf, full, plan, costs)
            if free_ids:
                out = await generate_greedy(e, free_ids, chat_tokens, s.exit())
                row["free_running_agreement"] = round(
                    statistics.fmean(agreement(a, b) for a, b in zip(out, full_chat, strict=True)), 4
                )
                row["free_running_common_prefix"] = round(
                    statistics.fmean(common_prefix(a, b) for a, b in zip(out, full_chat, strict=True)), 2
                )
                row["free_running_perplexity"] = round(await continuation_perplexity(engine, free_ids, out), 3)
                row["free_running_rouge_l"] = rouge_l(decode(out), decode(full_chat))
            rows.append(row)
            progress(
                f"[{i + 1}/{len(settings)}] {s.curve} {_knob(row)}: depth {row['mean_exit_depth']:.1f}, saved "
                f"{row['compute_saved']:.1%}, agreement {row['agreement']:.1%}, perplexity {row['perplexity']:.2f}"
            )
        backfills = dict.fromkeys(s.backfill for s in settings if s.backfill != "exact")
        if static_exact and set(static_exact) >= {d for d in plan.exit_points if d < plan.num_layers}:
            rows += [oracle_row(static_exact, full, plan.num_layers, plan.min_exit_depth, b, costs) for b in backfills]
        if served:
            conts = await continuations.continuations(engine, chat_ids, continuation_tokens, progress=progress)
            report_served = await continuations.score_exits(engines, conts, settings, costs, progress)
    finally:
        for e in engines.values():
            await e.shutdown()
    report = {"full": reference, "rows": rows, "at_agreement": at_agreement(rows, (0.95, 0.99))}
    return report | ({"served": report_served} if served else {})


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
    """The sweep as a text table, then compute saved at 95% and 99% agreement per curve, then the figures on
    the chat prompts' continuations."""
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
    if "served" in report:
        lines += ["", continuations.table(report["served"])]
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
