"""Exits scored on the traffic a server sees: the model's own greedy continuations of chat prompts (full
depth, stopping at EOS as served, generated once and cached), fed back teacher-forced with each prompt at
full depth and the exit controls on the generated tokens only. Per exit point, how often each head alone
predicts the full model's next token there (the pack's adapted head and the untrained identity head, the
logit lens) and how often some head does (the oracle); per setting, the compute it saves on generated
tokens and its agreement and perplexity there. This is `adept eval --chats`' served-traffic table."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.quality.evaluation import Costs, Setting, TeacherForced, compute_used, teacher_forced
from workers.model_store import cache_dir, resolve_model


@dataclass(frozen=True)
class Continuations:
    """Chat prompts (token ids, chat template applied) and the full model's greedy continuation of each."""

    prompts: list[list[int]]
    tokens: list[list[int]]

    @property
    def windows(self) -> list[list[int]]:
        return [p + t for p, t in zip(self.prompts, self.tokens, strict=True)]

    @property
    def starts(self) -> list[int]:
        """Each window's first generated position."""
        return [len(p) for p in self.prompts]

    def generated(self) -> torch.Tensor:
        """bool [positions of all windows]: generated positions that have a next token to predict."""
        masks = []
        for prompt, tokens in zip(self.prompts, self.tokens, strict=True):
            at = torch.arange(len(prompt) + len(tokens))
            masks.append((at >= len(prompt)) & (at < len(prompt) + len(tokens) - 1))
        return torch.cat(masks)


def _cache_key(engine: Engine, prompts: list[list[int]], max_tokens: int) -> str:
    """Greedy full-depth continuations depend on the weights and the prompts only (not the exit pack)."""
    folder = resolve_model(engine.config.model)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
    identity = {"model": str(folder), "files": files, "dtype": engine.config.dtype, "prompts": prompts,
                "max_tokens": max_tokens}  # fmt: skip
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


async def generate(
    engine: Engine,
    prompts: list[list[int]],
    max_tokens: int,
    temperature: float = 0.0,
    seeds: list[int | None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[list[int]]:
    """The model's own continuation of every prompt at full depth, at most `max_tokens`, ending at EOS as a
    served answer does: greedy, or sampled at `temperature` with request `seeds` (the same seed, the same
    continuation). All are submitted at once; the engine's scheduler batches them."""
    seeds = seeds or [None] * len(prompts)
    done = 0

    async def one(prompt: list[int], seed: int | None) -> list[int]:
        nonlocal done
        out: list[int] = []
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        async for item in engine.submit(prompt, sampling, {"policy": "none"}):
            out += item.token_ids
        done += 1
        if progress and (done % 32 == 0 or done == len(prompts)):
            progress(f"generated {done}/{len(prompts)} continuations")
        return out

    return list(await asyncio.gather(*(one(p, s) for p, s in zip(prompts, seeds, strict=True))))


async def continuations(
    engine: Engine,
    prompts: list[list[int]],
    max_tokens: int,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Continuations:
    """The full model's greedy continuation of every prompt (`generate`), kept under `cache` (default: the
    user cache) so that later evaluations reuse them."""
    cache = cache or cache_dir() / "continuations"
    path = cache / f"{_cache_key(engine, prompts, max_tokens)}.json"
    if path.exists():
        return Continuations(prompts, json.loads(path.read_text())["tokens"])
    tokens = await generate(engine, prompts, max_tokens, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": engine.config.model, "max_tokens": max_tokens, "tokens": tokens}))
    return Continuations(prompts, tokens)


@dataclass(frozen=True)
class Traffic:
    """What calibration reads as served-like data: chat prompts with the model's own continuations."""

    max_tokens: int = 128  # per continuation
    samples: int = 2  # sampled continuations per prompt, beside the greedy one
    temperature: float = 0.7
    seed: int = 0  # sample k of prompt i has request seed seed + i * samples + k


def self_generated(
    model: str, chats: list[list[dict[str, str]]], traffic: Traffic, progress: Callable[[str], None]
) -> tuple[list[list[int]], dict]:
    """Every chat prompt (chat template applied) with the greedy continuation and `traffic.samples` sampled
    ones, each as one window of token ids (prompt, then continuation), generated by the engine at full depth;
    and what they are, for the pack's manifest. Prompts too long for a continuation are left out."""
    config = EngineConfig(model=model, exit_pack="none", num_layer_groups=1, max_num_seqs=64,
                          max_waiting_requests=max(256, len(chats) * (1 + traffic.samples)))  # fmt: skip
    engine = Engine.local(config)

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        try:
            room = engine.plan.max_model_len - traffic.max_tokens
            prompts = [p for p in map(engine.chat_prompt, chats) if len(p) <= room]
            n = traffic.samples
            seeds = [traffic.seed + i * n + k for i in range(len(prompts)) for k in range(n)]
            progress(f"generating {len(prompts) * (1 + n)} continuations of {len(prompts)} chat prompts")
            greedy = await generate(engine, prompts, traffic.max_tokens, progress=progress)
            sampled_prompts = [p for p in prompts for _ in range(n)]
            sampled = await generate(engine, sampled_prompts, traffic.max_tokens, traffic.temperature, seeds, progress)
            return prompts + sampled_prompts, greedy + sampled
        finally:
            await engine.shutdown()

    prompts, tokens = asyncio.run(run())
    windows = [p + t for p, t in zip(prompts, tokens, strict=True)]
    described = asdict(traffic) | {
        "prompts_used": len(prompts) // (1 + traffic.samples),
        "continuations": len(tokens),
        "prompt_tokens": sum(map(len, prompts)),
        "generated_tokens": sum(map(len, tokens)),
    }
    return windows, described


@dataclass
class _Scored:
    """A teacher-forced run over the continuations, read on their generated positions only."""

    tf: TeacherForced
    mask: torch.Tensor  # generated positions with a next token

    @property
    def predictions(self) -> torch.Tensor:
        return self.tf.predictions[self.mask]

    @property
    def exit_layers(self) -> torch.Tensor:
        return self.tf.exit_layers[self.mask]

    @property
    def logprobs(self) -> torch.Tensor:
        return self.tf.target_logprobs[self.mask[self.tf.scored]]


async def _run(engine: Engine, conts: Continuations, exit: dict, mask: torch.Tensor) -> _Scored:
    return _Scored(await teacher_forced(engine, conts.windows, exit, exit_from=conts.starts), mask)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a == b).double().mean()), 4) if a.numel() else 1.0


async def score_exits(
    engines: dict[str, Engine],
    conts: Continuations,
    settings: list[Setting],
    costs: Costs,
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Exit heads and settings on the continuations' generated tokens (teacher-forced, prompts at full
    depth, back-fill as served): agreement with the full model's prediction per exit point and head kind,
    the oracle over the adapted heads, then one row per setting."""
    engine = engines["adapted"]
    plan = engine.plan
    mask = conts.generated()
    progress(f"served traffic: {int(mask.sum())} generated tokens of {len(conts.prompts)} chat continuations")
    full = await _run(engine, conts, {"policy": "none"}, mask)
    depths = [d for d in plan.exit_points if d < plan.num_layers]
    heads: dict[str, dict[str, float]] = {}
    hits: dict[int, torch.Tensor] = {}  # per depth: where the adapted head predicts the full model's token
    for kind, e in engines.items():
        for d in depths:
            got = await _run(e, conts, {"policy": "static", "max_depth": d, "backfill": "exact"}, mask)
            heads.setdefault(str(d), {})[kind] = _agreement(got.predictions, full.predictions)
            if kind == "adapted":
                hits[d] = got.predictions == full.predictions
        progress(f"served traffic, {kind} heads: " + ", ".join(f"{d} {heads[str(d)][kind]:.1%}" for d in depths))
    exit_at = torch.full_like(full.predictions, plan.num_layers)
    for d in sorted(hits, reverse=True):  # shallower depths overwrite deeper ones
        exit_at[hits[d]] = d
    oracle = {
        b: round(1 - compute_used(exit_at, depths, plan.num_layers, "oracle", b, plan.min_exit_depth, costs)[0], 4)
        for b in ("decoupled", "mapped")
    }
    reference = {"perplexity": round(math.exp(-float(full.logprobs.mean())), 3), "tokens": int(mask.sum()),
                 "chat_prompts": len(conts.prompts)}  # fmt: skip
    rows = []
    for i, s in enumerate(settings):
        got = await _run(engines[s.head], conts, s.exit(), mask)
        layers, overhead = compute_used(
            got.exit_layers, list(plan.exit_points), plan.num_layers, s.policy, s.backfill, plan.min_exit_depth, costs
        )
        rows.append({
            "curve": s.curve, "policy": s.policy, "head": s.head, "backfill": s.backfill, "threshold": s.threshold,
            "max_depth": s.max_depth, "mean_exit_depth": round(float(got.exit_layers.double().mean()), 3),
            "compute_saved": round(1.0 - layers, 4), "decision_overhead": round(overhead, 4),
            "agreement": _agreement(got.predictions, full.predictions),
            "perplexity": round(math.exp(-float(got.logprobs.mean())), 3),
        })  # fmt: skip
        row = rows[-1]
        progress(f"served traffic [{i + 1}/{len(settings)}] {s.curve} {s.exit()}: saved {row['compute_saved']:.1%}, "
                 f"agreement {row['agreement']:.1%}")  # fmt: skip
    return {"full": reference, "heads": heads, "oracle": {"reached": round(float((exit_at < plan.num_layers)
            .double().mean()), 4), "compute_saved": oracle}, "rows": rows}  # fmt: skip


def table(report: dict) -> str:
    """The served-traffic figures as text: agreement per exit point and head, the oracle, the settings."""
    heads = report["heads"]
    kinds = list(dict.fromkeys(k for figures in heads.values() for k in figures))
    full = report["full"]
    lines = [f"served traffic: {full['tokens']} generated tokens of {full['chat_prompts']} chat continuations "
             f"(full depth perplexity {full['perplexity']:.3f})", "",
             f"{'exit point':<12}" + "".join(f"{k:>12}" for k in kinds)]  # fmt: skip
    for d, figures in heads.items():
        lines.append(f"{d:<12}" + "".join(f"{figures[k]:>12.1%}" for k in kinds))
    oracle = report["oracle"]
    lines += ["", f"oracle (adapted heads): {oracle['reached']:.1%} of tokens exit early, compute saved "
              + ", ".join(f"{v:.1%} {b}" for b, v in oracle["compute_saved"].items()), ""]  # fmt: skip
    for r in report["rows"]:
        knob = f"depth {r['max_depth']}" if r["max_depth"] is not None else f"threshold {r['threshold']}"
        lines.append(f"{r['curve']:<36} {knob:>14} {r['mean_exit_depth']:>6.2f} {r['compute_saved']:>7.1%} "
                     f"{r['agreement']:>7.1%} {r['perplexity']:>8.3f}")  # fmt: skip
    return "\n".join(lines)
