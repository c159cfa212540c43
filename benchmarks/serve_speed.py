"""Serving speed through Ray Serve against the in-process engine, on one machine.

N concurrent greedy streams (64 tokens each) through HTTP against the application as `adept serve` runs
it (three layer groups, one worker actor each), and the same N streams through the in-process engine
configured alike (three layer groups), in interleaved rounds (in-process, Serve, in-process, ...): the
aggregate tokens/s of each and their ratio, and the median time to first token, for each exit setting.

    python benchmarks/serve_speed.py --streams 1 16 64 --rounds 2 --json out.json   # ~20 min on 2 cores
    python benchmarks/serve_speed.py --quick

`--max-inflight-batches` and `--sync-backfill` apply to both sides (layer-group pipelining, and the
reference that awaits every back-fill); `--stream-interval` to the application.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable

import httpx
from engine_speed import PROMPTS, log, machine, publish  # benchmarks/ is on sys.path

from serving.app import build_app
from serving.config import AppConfig, Listener
from serving.deploy import server
from serving.engine import Engine
from serving.engine.config import EngineConfig

EXITS = {
    "full depth": {"policy": "none"},
    "pack default": {},
    "static 16": {"policy": "static", "max_depth": 16, "backfill": "decoupled"},
}


async def http_stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int, exit: dict):
    """(seconds to the first token, tokens) of one streamed completion."""
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
    return first, count


async def engine_stream(engine: Engine, prompt: str, tokens: int, exit: dict):
    sampling = {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    started = time.perf_counter()
    first, count = None, 0
    async for out in engine.generate(prompt, sampling, exit):
        first = first or time.perf_counter() - started
        count += len(out.token_ids)
    return first, count


async def load(stream, n: int) -> dict:
    """`n` streams at once: aggregate tokens/s and median time to first token."""
    started = time.perf_counter()
    results = await asyncio.gather(*(stream(PROMPTS[i % len(PROMPTS)]) for i in range(n)))
    elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": sum(r[1] for r in results) / elapsed,
        "ttft_p50_s": statistics.median(r[0] for r in results),
    }


def server_options(p: argparse.ArgumentParser) -> None:
    """Where the benchmark's local application listens, and where its report goes."""
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--json", help="also write the report to this file")


def local_app(args: argparse.Namespace, engine: EngineConfig, **fields: object) -> AppConfig:
    """The application on loopback, on the ports `--http-port` and `--grpc-port` say."""
    listeners = {"http": Listener(host="127.0.0.1", port=args.http_port)}
    listeners["grpc"] = Listener(host="127.0.0.1", port=args.grpc_port)
    return AppConfig(engine=engine, **listeners, **fields)


def main(args: argparse.Namespace) -> dict:
    engine = EngineConfig(
        num_layer_groups=3,
        max_model_len=512,
        max_inflight_batches=args.max_inflight_batches,
        sync_backfill=args.sync_backfill,
    )
    config = local_app(args, engine, stream_interval=args.stream_interval)
    report: dict = {
        "machine": machine(),
        "engine": engine.model_dump(include={"num_layer_groups", "max_inflight_batches", "sync_backfill"}),
        "max_tokens": args.max_tokens,
        "stream_interval": args.stream_interval,
    }
    server.init_ray(config, num_cpus=os.cpu_count())
    url = f"http://127.0.0.1:{args.http_port}"
    try:
        local = Engine.local(engine)
        server.start(config, build_app(config))
        model = config.served_name()

        async def measure(side: str, n: int, exit: dict) -> dict:
            async with httpx.AsyncClient(timeout=1200, limits=httpx.Limits(max_connections=n + 8)) as client:

                def stream(prompt: str):
                    if side == "in-process":
                        return engine_stream(local, prompt, args.max_tokens, exit)
                    return http_stream(client, url, model, prompt, args.max_tokens, exit)

                await stream(PROMPTS[0])  # warm-up
                return await load(stream, n)

        for name in args.exits:
            exit, rows = EXITS[name], {}
            for n in args.streams:
                runs: dict[str, list[dict]] = {"in-process": [], "Serve": []}
                for r in range(args.rounds):
                    for side in runs:
                        runs[side].append(asyncio.run(measure(side, n, exit)))
                    log(f"  {name}, {n} streams, round {r + 1}: "
                        + ", ".join(f"{s} {v[-1]['tokens_per_s']:.1f} tok/s" for s, v in runs.items()))  # fmt: skip
                ratios = [s["tokens_per_s"] / i["tokens_per_s"] for i, s in zip(*runs.values(), strict=True)]
                rows[n] = {
                    side: {
                        "tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in v), 1),
                        "ttft_p50_s": round(statistics.median(x["ttft_p50_s"] for x in v), 3),
                    }
                    for side, v in runs.items()
                } | {"serve_vs_in_process": [round(x, 3) for x in ratios]}
            report[name] = rows
    finally:
        server.stop()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-inflight-batches", type=int, default=1)
    p.add_argument("--sync-backfill", action="store_true")
    p.add_argument(
        "--stream-interval",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="tokens per streamed chunk after the first, or auto (the application's default)",
    )
    p.add_argument("--exits", nargs="+", choices=list(EXITS), default=list(EXITS))
    p.add_argument("--quick", action="store_true", help="a smoke run")
    server_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.streams, args.rounds = 8, [1, 4], 1
    return args


def run_benchmark(main: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> None:
    """Run a benchmark of the local application (a throwaway Ray cluster: no token files) and publish it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    publish(main(args), args.json)


if __name__ == "__main__":
    run_benchmark(main, parse_args())
