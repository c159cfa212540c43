"""KV memory in pages, in-process on the default model (three layer groups, as `adept serve` runs it).

1. Memory per cached token at N concurrent streams: after every step, the bytes of the blocks the pool has
   handed out (blocks used x bytes of one block over every layer) over the positions that hold K/V
   (each running sequence's fed tokens, and the one its step in flight writes), against the model's K/V
   size per token; the mean over the decoding steps where all N streams run.
2. Memory pressure: N streams with a KV budget that holds a quarter of their tokens, against the same
   streams with room for all, in interleaved rounds: every stream must finish; at full depth the greedy
   texts must be identical; preemptions and the throughput ratio are reported, and for the shipped
   pack's default exits how many texts differ (recompute in prefill shapes may flip a threshold decision).

    python benchmarks/kv_memory.py --streams 16 64 --rounds 2 --json out.json
    python benchmarks/kv_memory.py --chat ...     # chat instructions as prompts (longer sequences)
"""

from __future__ import annotations

import asyncio
import statistics
import time

from engine_speed import engine_parser, log, machine, publish  # benchmarks/ is on sys.path
from exit_batching import prompts_for

from serving.engine import Engine
from serving.engine.config import EngineConfig
from workers.kv_cache import blocks_for, kv_bytes_per_token

FULL = {"policy": "none"}


def make(args, **config) -> Engine:
    return Engine.local(EngineConfig(model=args.model, num_layer_groups=args.layer_groups, max_model_len=256, **config))


async def run(engine: Engine, prompts: list[list[int]], max_tokens: int, exit: dict) -> dict:
    """The prompts as greedy streams of exactly `max_tokens` at once; K/V bytes per cached token."""
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    block_bytes = sum(g.block_bytes for g in engine.pipeline.groups)
    per_cached: list[float] = []

    async def watch() -> None:
        while True:
            running = engine.scheduler.running
            # positions holding K/V, or being written by the step in flight (one per decoding sequence)
            cached = sum(s.num_computed + s.in_flight for s in running)
            if len(running) == len(prompts) and all(s.prefill_done for s in running):
                used = engine.scheduler.pool.capacity - engine.scheduler.pool.num_free
                per_cached.append(used * block_bytes / cached)
            await asyncio.sleep(0.01)

    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompts[i], sampling, exit):
            tokens += out.token_ids
        return tokens

    watcher = asyncio.create_task(watch())
    preempted = engine.scheduler.preemptions
    started = time.perf_counter()
    outputs = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    elapsed = time.perf_counter() - started
    watcher.cancel()
    return {
        "tokens_per_s": sum(map(len, outputs)) / elapsed,
        "outputs": outputs,
        "preemptions": engine.scheduler.preemptions - preempted,
        "bytes_per_cached_token": statistics.fmean(per_cached) if per_cached else None,
    }


async def main(args) -> dict:
    report: dict = {
        "model": args.model,
        "machine": machine(),
        "layer_groups": args.layer_groups,
        "max_tokens": args.max_tokens,
        "prompts": "chat instructions" if args.chat else "short",
    }
    roomy = make(args)
    arch = roomy.arch
    model_bytes = kv_bytes_per_token(arch.num_layers, arch.num_kv_heads, arch.head_dim)
    report["model_kv_bytes_per_token"] = model_bytes
    log(f"[1/2] K/V bytes per cached token (the model's: {model_bytes})")
    memory = {}
    for n in args.streams:
        got = await run(roomy, prompts_for(roomy, n, 256 - args.max_tokens, args.chat), args.max_tokens, FULL)
        ratio = got["bytes_per_cached_token"] / model_bytes
        memory[n] = {"bytes_per_cached_token": round(got["bytes_per_cached_token"]), "vs_model": round(ratio, 3)}
        log(f"  {n} streams: {memory[n]}")
    report["memory_per_token"] = memory

    n = max(args.streams)
    prompts = prompts_for(roomy, n, 256 - args.max_tokens, args.chat)
    blocks = sum(blocks_for(len(p) + args.max_tokens, 16) for p in prompts)
    block_bytes = sum(g.block_bytes for g in roomy.pipeline.groups)
    tight = make(args, kv_cache_memory=max(blocks // 4, blocks_for(256, 16)) * block_bytes)
    log(f"[2/2] {n} streams, {tight.scheduler.pool.capacity} blocks for the {blocks} they fill, {args.rounds} rounds")
    pressure = {}
    for name, exit in {"full depth": FULL, "pack default": {}}.items():
        ratios, preemptions, differ = [], [], []
        for r in range(args.rounds):
            free = await run(roomy, prompts, args.max_tokens, exit)
            pressed = await run(tight, prompts, args.max_tokens, exit)
            assert all(len(o) == args.max_tokens for o in pressed["outputs"]), "a stream did not finish"
            ratios.append(pressed["tokens_per_s"] / free["tokens_per_s"])
            preemptions.append(pressed["preemptions"])
            differ.append(sum(a != b for a, b in zip(free["outputs"], pressed["outputs"], strict=True)))
            log(f"  {name} round {r + 1}: {pressed['tokens_per_s']:.1f} vs {free['tokens_per_s']:.1f} tok/s, "
                f"{preemptions[-1]} preemptions, {differ[-1]} of {n} texts differ")  # fmt: skip
        pressure[name] = {
            "throughput_vs_unpressured": [round(x, 3) for x in ratios],
            "median": round(statistics.median(ratios), 3),
            "preemptions": preemptions,
            "texts_differing": differ,
        }
    report["pressure"] = {"streams": n, "blocks": tight.scheduler.pool.capacity, "blocks_filled": blocks, **pressure}
    await roomy.shutdown()
    await tight.shutdown()
    return report


if __name__ == "__main__":
    p = engine_parser(__doc__)
    p.set_defaults(layer_groups=3)
    p.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--chat", action="store_true", help="chat instructions (../shared) instead of short prompts")
    args = p.parse_args()
    publish(asyncio.run(main(args)), args.json)
