"""A bounded load run on loopback: N clients stream chat completions back to back for a fixed time against
the application as `adept serve` runs it (real Ray, Serve, HTTP). Reports requests completed, errors by
kind, p50/p99 time to first token and time per output token, tokens/s, and the memory of every Ray process
at the start and the end. Options: trace every request to a local OTLP sink (--tracing: the cost of
tracing), or kill a layer-group worker mid-run (--kill-worker-at: recovery time).

    python benchmarks/load.py --concurrency 16 --duration 300 --json out.json
    python benchmarks/load.py --concurrency 16 --duration 60 --tracing
    python benchmarks/load.py --concurrency 16 --duration 60 --kill-worker-at 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psutil

PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it famous?",
    "Give me three tips for staying healthy.",
    "Describe the water cycle in simple words.",
    "Why is the sky blue?",
    "Summarize the plot of a detective story in a few sentences.",
    "How do airplanes stay in the air?",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def otlp_sink() -> tuple[str, list[int]]:
    """An OTLP/HTTP endpoint that accepts and counts what it is sent (the collector's side is not measured)."""
    received: list[int] = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(len(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1/traces", received


def ray_process_list() -> list[tuple[str, psutil.Process]]:
    """This process and every Ray process, each with its title (pid appended)."""
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        title = cmd.split(" ")[0] if cmd.startswith("ray::") else p.info["name"]
        if p.info["pid"] == os.getpid() or cmd.startswith("ray::") or title in ("raylet", "gcs_server"):
            found.append((f"{title} [{p.info['pid']}]", p))
    return found


def ray_processes() -> dict[str, float]:
    """Resident memory (MiB) of this process and every Ray process, by title."""
    found = {}
    for title, p in ray_process_list():
        with contextlib.suppress(psutil.NoSuchProcess):
            found[title] = p.memory_info().rss / 2**20
    return found


class Run:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.tokens = 0
        self.completed = 0
        self.errors: Counter[str] = Counter()
        self.token_times: list[float] = []


async def client_loop(client: httpx.AsyncClient, url: str, model: str, run: Run, stop: float, rng, tokens: int):
    while time.monotonic() < stop:
        body = {
            "model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": tokens,
            "temperature": 0.7, "seed": rng.randrange(2**31), "stream": True,
        }  # fmt: skip
        started = time.monotonic()
        first = last = None
        n = 0
        try:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    run.errors[f"HTTP {r.status_code} {r.json()['error']['type']}"] += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", 0)))
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        run.errors[f"stream error {event['error']['type']}"] += 1
                        break
                    got = len(event.get("adept", {}).get("token_ids", []))
                    if got:
                        now = time.monotonic()
                        first = first or now
                        last, n = now, n + got
                        run.token_times.append(now)
                else:
                    run.completed += 1
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            run.errors[type(e).__name__] += 1
            continue
        run.tokens += n
        if first is not None:
            run.ttft.append(first - started)
            if n > 1:
                run.tpot.append((last - first) / (n - 1))


def pct(values: list[float], q: float) -> float | None:
    return round(statistics.quantiles(values, n=100)[q - 1], 4) if len(values) >= 2 else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=300, help="seconds of load (clients start no request after)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--layer-groups", type=int, default=3)
    p.add_argument(
        "--max-num-seqs", type=int, default=128, help="running sequences at most (adept serve's default: 128)"
    )
    p.add_argument("--tracing", action="store_true", help="trace every request, exported to a local OTLP sink")
    p.add_argument("--kill-worker-at", type=float, help="SIGKILL the middle layer-group worker at this second")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    received: list[int] = []
    if args.tracing:
        endpoint, received = otlp_sink()
        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint  # before Ray starts: its processes inherit it
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from ray import serve

    from serving.app import build_app
    from serving.config import APP_NAME, AppConfig
    from serving.deploy import server
    from serving.engine.config import EngineConfig

    config = AppConfig(
        engine=EngineConfig(num_layer_groups=args.layer_groups, max_num_seqs=args.max_num_seqs),
        trace_sampling_ratio=1.0 if args.tracing else 0.01,
    )
    server.init_ray(config)
    server.start(config, build_app(config))
    url = f"http://{config.http.host}:{config.http.port}"
    replica = serve.get_deployment_handle("PipelineReplica", APP_NAME)
    model = config.served_name()
    try:
        httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4}, timeout=120)
        memory_start = ray_processes()
        run = Run()
        kill = {}

        async def go() -> None:
            stop = time.monotonic() + args.duration
            limits = httpx.Limits(max_connections=args.concurrency + 8)
            async with httpx.AsyncClient(timeout=600, limits=limits) as client:
                rngs = [random.Random(i) for i in range(args.concurrency)]
                tasks = [client_loop(client, url, model, run, stop, rng, args.max_tokens) for rng in rngs]
                if args.kill_worker_at is not None:
                    tasks.append(killer(args.kill_worker_at))
                progress = asyncio.create_task(report(stop))
                await asyncio.gather(*tasks)
                progress.cancel()

        async def report(stop: float) -> None:
            while time.monotonic() < stop:
                await asyncio.sleep(30)
                log(f"  {time.monotonic() - started:.0f} s: {run.completed} requests, {run.tokens} tokens, "
                    f"errors {dict(run.errors) or 'none'}")  # fmt: skip

        async def killer(at: float) -> None:
            await asyncio.sleep(at)
            victim = (await replica.workers.remote())[args.layer_groups // 2]
            kill["time"] = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            log(f"killed the layer-group worker of layers {victim['layers']} (pid {victim['pid']})")

        started = time.monotonic()
        log(f"{args.concurrency} streams for {args.duration:.0f} s ...")
        asyncio.run(go())
        elapsed = time.monotonic() - started
        memory_end = ray_processes()
        result = {
            "concurrency": args.concurrency,
            "duration_s": round(elapsed, 1),
            "max_tokens": args.max_tokens,
            "max_num_seqs": args.max_num_seqs,
            "tracing": args.tracing,
            "requests_completed": run.completed,
            "errors": dict(run.errors),
            "tokens": run.tokens,
            "tokens_per_s": round(run.tokens / elapsed, 2),
            "ttft_p50_s": pct(run.ttft, 50),
            "ttft_p99_s": pct(run.ttft, 99),
            "tpot_p50_s": pct(run.tpot, 50),
            "tpot_p99_s": pct(run.tpot, 99),
            "memory_mib_start": {k: round(v) for k, v in memory_start.items()},
            "memory_mib_end": {k: round(v) for k, v in memory_end.items()},
        }
        if args.tracing:
            result["otlp_exports"] = {"requests": len(received), "bytes": sum(received)}
        if "time" in kill:
            # Every stream of the pipeline waits while the worker restarts: the longest silence after the kill.
            times = sorted(t for t in run.token_times if t > kill["time"] - 1)
            gaps = [b - a for a, b in itertools.pairwise(times) if b > kill["time"]]
            result["longest_pause_after_kill_s"] = round(max(gaps), 2) if gaps else None
            result["blocks_after"] = replica.kv_blocks.remote().result()
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
