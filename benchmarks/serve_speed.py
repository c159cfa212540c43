"""Serving speed through Ray Serve against the in-process engine, on one machine.

1. One stream: time to first token and tokens/s through HTTP (streaming) against the in-process engine with
   the same engine configuration.
2. Aggregate tokens/s with 1, 4 and 16 concurrent HTTP streams, for the default configuration (one
   micro-batch in flight, back-fill off the critical path), with layer-group pipelining (several
   micro-batches in flight), and with back-fill awaited synchronously.

Each variant runs at full depth and with confidence exit (decoupled back-fill), where back-fill matters.

    python benchmarks/serve_speed.py --json out.json            # ~10 min on 2 cores
    python benchmarks/serve_speed.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch
from engine_speed import PROMPTS  # the same prompts as the engine benchmark (benchmarks/ is on sys.path)
from ray import serve

from serving import server
from serving.config import AppConfig, EngineConfig, Listener
from serving.engine import Engine

EXITS = {"full depth": {"policy": "none"}, "confidence 0.5": {"policy": "confidence", "threshold": 0.5}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def http_stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int, exit: dict):
    """(seconds to the first token, seconds in all, tokens) of one streamed completion."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "adept": exit,
    }  # fmt: skip
    started = time.perf_counter()
    first, count = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            n = len(json.loads(line[6:])["adept"]["token_ids"])
            if n and first is None:
                first = time.perf_counter() - started
            count += n
    return first, time.perf_counter() - started, count


async def http_load(url: str, model: str, streams: int, tokens: int, exit: dict, rounds: int) -> dict:
    """`streams` concurrent streams, `rounds` requests each: aggregate tokens/s and mean TTFT."""
    async with httpx.AsyncClient(timeout=600) as client:
        await http_stream(client, url, model, PROMPTS[0], 4, exit)  # warm-up
        started = time.perf_counter()

        async def worker(i: int):
            return [
                await http_stream(client, url, model, PROMPTS[(i + r) % len(PROMPTS)], tokens, exit)
                for r in range(rounds)
            ]

        results = [x for per in await asyncio.gather(*(worker(i) for i in range(streams))) for x in per]
        elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": round(sum(r[2] for r in results) / elapsed, 1),
        "ttft_ms": round(1000 * statistics.fmean(r[0] for r in results), 1),
        "stream_tokens_per_s": round(statistics.fmean(r[2] / r[1] for r in results), 1),
    }


async def in_process(config: EngineConfig, tokens: int, exit: dict, rounds: int) -> dict:
    engine = Engine.local(config)
    sampling = {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    async for _ in engine.generate(PROMPTS[0], {**sampling, "max_tokens": 4}, exit):
        pass
    ttfts, rates = [], []
    for r in range(rounds):
        started = time.perf_counter()
        first, count = None, 0
        async for out in engine.generate(PROMPTS[r % len(PROMPTS)], sampling, exit):
            first = first or time.perf_counter() - started
            count += len(out.token_ids)
        ttfts.append(first)
        rates.append(count / (time.perf_counter() - started))
    await engine.shutdown()
    return {
        "ttft_ms": round(1000 * statistics.fmean(ttfts), 1),
        "stream_tokens_per_s": round(statistics.fmean(rates), 1),
    }


def main(args: argparse.Namespace) -> dict:
    base = EngineConfig(max_num_seqs=max(args.streams), max_model_len=512)
    variants = {
        "default": base,
        f"pipelined ({args.micro_batches} micro-batches)": base.model_copy(
            update={"max_inflight_batches": args.micro_batches}
        ),
        "synchronous back-fill": base.model_copy(update={"sync_backfill": True}),
    }
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, cpu",
        "engine": base.model_dump(include={"num_layer_groups", "max_num_seqs", "max_inflight_batches"}),
        "max_tokens": args.max_tokens,
    }
    log("[1/2] one stream, in-process engine")
    report["in_process"] = {
        name: asyncio.run(in_process(base, args.max_tokens, exit, args.rounds)) for name, exit in EXITS.items()
    }
    log(f"  {report['in_process']}")
    config = AppConfig(
        engine=base,
        http=Listener(host="127.0.0.1", port=args.http_port),
        grpc=Listener(host="127.0.0.1", port=args.grpc_port),
    )
    server.init_ray(config, num_cpus=os.cpu_count())
    url = f"http://127.0.0.1:{args.http_port}"
    report["serve"] = {}
    try:
        for v, (variant, engine) in enumerate(variants.items()):
            log(f"[2/2] through Ray Serve ({v + 1}/{len(variants)}): {variant}")
            variant_config = config.model_copy(update={"engine": engine})
            server.start(variant_config)
            rows = {}
            for name, exit in EXITS.items():
                for streams in args.streams:
                    rounds = max(1, args.rounds * args.streams[0] // streams) if streams > 1 else args.rounds
                    row = asyncio.run(http_load(url, config.served_name(), streams, args.max_tokens, exit, rounds))
                    rows[f"{name}, {streams} streams"] = row
                    log(f"  {name}, {streams} streams: {row}")
            report["serve"][variant] = rows
            serve.delete("adept")
    finally:
        server.stop()
    for name in EXITS:
        one = report["serve"]["default"][f"{name}, 1 streams"]
        many = report["serve"]["default"][f"{name}, {max(args.streams)} streams"]
        report.setdefault("targets", {})[name] = {
            "one_stream_vs_in_process": round(
                one["stream_tokens_per_s"] / report["in_process"][name]["stream_tokens_per_s"], 2
            ),
            f"{max(args.streams)}_streams_vs_one": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
        }
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=4, help="requests per stream at 1 stream")
    p.add_argument("--micro-batches", type=int, default=3, help="micro-batches in flight when pipelined")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--quick", action="store_true", help="a smoke run")
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.streams, args.rounds = 8, [1, 4], 1
    return args


if __name__ == "__main__":
    args = parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    report = main(args)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
