"""Early exit under batching, in-process: tokens/s of exit settings against full depth at N concurrent
requests, as ratios from interleaved rounds (full, setting A, setting B, ..., full, ...), with the two
bounds of a batch's gain: the compute bound (layers run: num_layers / mean exit layer) and the weight-read
bound (a layer's weights are read once if any row of the step needs it: num_layers / the mean over steps of
the deepest row's exit layer), which is what limits decoding when it is memory-bound.

    python benchmarks/exit_batching.py --concurrency 8 64 --rounds 5 --json out.json

Prompts: eight short built-in ones, cycled (decoding dominates: the bounds, computed from generated tokens,
apply); `--chat` takes the chat instructions in ../shared/data/chat/instructions.jsonl instead (long
prompts: prefill, whose tokens exit too, weighs in).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path

from engine_speed import PROMPTS as SHORT  # benchmarks/ is on sys.path
from engine_speed import engine_parser, log, machine, publish

from serving.engine import Engine
from serving.engine.config import EngineConfig
from workers.corpus import CorpusPart, chat_prompts

CHAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat" / "instructions.jsonl"
FULL = {"policy": "none"}
SETTINGS = {
    "pack default": {},
    "learned 0.3, mapped": {"policy": "learned", "threshold": 0.3, "backfill": "mapped"},
    "static 16, decoupled": {"policy": "static", "max_depth": 16, "backfill": "decoupled"},
}


def prompts_for(engine: Engine, n: int, longest: int, chat: bool) -> list[list[int]]:
    """`n` prompts of at most `longest` tokens."""
    if chat:
        if not CHAT.is_file():
            raise SystemExit(f"--chat needs {CHAT} (the shared data folder beside the checkout)")
        found = [engine.chat_prompt(messages) for messages in chat_prompts(CorpusPart.of(CHAT))]
    else:
        found = [engine.admission.prompt_ids(p) for p in SHORT]
    found = [p for p in found if len(p) <= longest][:n]
    return [found[i % len(found)] for i in range(n)]


async def run(engine: Engine, prompts: list[list[int]], max_tokens: int, exit: dict) -> tuple[float, list[list[int]]]:
    """All prompts at once (greedy, exactly `max_tokens` each): tokens/s and each request's exit layers."""
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    layers: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        async for out in engine.generate(prompts[i], sampling, exit):
            layers[i] += out.exit_layers

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return sum(map(len, layers)) / (time.perf_counter() - started), layers


def bounds(layers: list[list[int]], num_layers: int) -> dict[str, float]:
    """The gain the exit layers allow: by compute (mean layer) and by weight reads (deepest row per step;
    the requests decode in lock-step, so step t holds every request's t-th token)."""
    mean = statistics.fmean(itertools.chain(*layers))
    deepest = statistics.fmean(max(step) for step in zip(*layers, strict=True))
    return {"mean_exit_layer": round(mean, 2), "compute_bound": round(num_layers / mean, 3),
            "deepest_row_layer": round(deepest, 2), "weight_read_bound": round(num_layers / deepest, 3)}  # fmt: skip


async def main(args: argparse.Namespace) -> dict:
    most = max(args.concurrency)
    config = EngineConfig(model=args.model, num_layer_groups=args.layer_groups, max_num_seqs=most,
                          max_model_len=args.max_model_len)  # fmt: skip
    engine = Engine.local(config)
    num_layers = engine.plan.num_layers
    report: dict = {
        "model": args.model,
        "machine": machine(),
        "layer_groups": args.layer_groups,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "prompts": "chat instructions" if args.chat else "short",
        "default_exit": engine.exit_defaults.model_dump(exclude_none=True),
        "results": {},
    }
    for n in args.concurrency:
        prompts = prompts_for(engine, n, args.max_model_len - args.max_tokens - 1, args.chat)
        await run(engine, prompts[:2], 4, FULL)  # warm-up
        speeds: dict[str, list[float]] = {name: [] for name in ["full depth", *SETTINGS]}
        seen: dict[str, list[list[int]]] = {}
        for r in range(args.rounds):
            for name, exit in [("full depth", FULL), *SETTINGS.items()]:
                tps, layers = await run(engine, prompts, args.max_tokens, exit)
                speeds[name].append(tps)
                seen[name] = layers
                log(f"{n} concurrent, round {r + 1}/{args.rounds}, {name}: {tps:.1f} tok/s")
        rows = {}
        for name in SETTINGS:
            ratios = [s / f for s, f in zip(speeds[name], speeds["full depth"], strict=True)]
            rows[name] = {
                "speedup_median": round(statistics.median(ratios), 3),
                "speedup_min": round(min(ratios), 3),
                "speedup_max": round(max(ratios), 3),
                "tokens_per_s_median": round(statistics.median(speeds[name]), 1),
                **bounds(seen[name], num_layers),
            }
            log(f"{n} concurrent, {name}: {json.dumps(rows[name])}")
        rows["full depth"] = {"tokens_per_s_median": round(statistics.median(speeds["full depth"]), 1)}
        report["results"][str(n)] = rows
    await engine.shutdown()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = engine_parser(__doc__)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 64])
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chat", action="store_true", help="long chat prompts instead of short ones")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    publish(asyncio.run(main(args)), args.json)
