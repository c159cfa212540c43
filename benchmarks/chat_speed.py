"""Chat generation end to end, an exit setting (the server's default or --exit) against full depth: the
report half of ../shared/data/chat/instructions.jsonl (chat template applied, greedy, ending at EOS as
served), in the in-process engine as `adept generate --chat` runs it and through Ray Serve's HTTP
endpoint as `adept serve` answers it. Per setting: generated tokens per second, decode and prompt layer
compute saved, and ROUGE-L of the answers against full depth's; the two settings alternate (full depth,
exits, full depth, ...) and the ratio is taken per round.

    python benchmarks/chat_speed.py --rounds 3 --prompts 16 --json out.json
    python benchmarks/chat_speed.py --exit '{"policy": "learned", "threshold": 0.45}' --paths generate
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import httpx
from engine_speed import log, machine  # benchmarks/ is on sys.path
from serve_speed import local_app, run_benchmark, server_options

from serving.app import build_app
from serving.deploy import server
from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.quality.evaluation import rouge_l
from workers.corpus import CorpusPart, chat_prompts

CHATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat" / "instructions.jsonl"
FULL = {"policy": "none", "prefill": {"policy": "none"}}


def chats(limit: int) -> list[list[dict[str, str]]]:
    return list(chat_prompts(CorpusPart.of(str(CHATS), (0.5, 1.0))))[:limit]


async def in_process(engine: Engine, messages: list[list[dict[str, str]]], exit: dict, args) -> dict:
    """One request at a time, as `adept generate --chat` runs them."""
    texts, usage = [], []
    started = time.monotonic()
    for m in messages:
        text, last = "", None
        async for out in engine.submit(engine.chat_prompt(m), {"max_tokens": args.max_tokens, "temperature": 0.0},
                                       exit or None):  # fmt: skip
            text, last = text + out.text, out
        texts.append(text)
        usage.append(dataclasses.asdict(last.usage))
    return _figures(texts, usage, time.monotonic() - started)


async def served(url: str, model: str, messages: list[list[dict[str, str]]], exit: dict, args) -> dict:
    """`--concurrency` streams at once through the HTTP endpoint."""
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(m: list[dict[str, str]]) -> dict:
            body = {"model": model, "messages": m, "max_tokens": args.max_tokens, "temperature": 0,
                    "adept": exit}  # fmt: skip
            async with gate:
                r = await client.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()

        started = time.monotonic()
        outs = await asyncio.gather(*(one(m) for m in messages))
        seconds = time.monotonic() - started
    return _figures([o["choices"][0]["message"]["content"] for o in outs], [o["usage"] for o in outs], seconds)


def _figures(texts: list[str], usage: list[dict], seconds: float) -> dict:
    def total(key: str) -> int:
        return sum(u[key] for u in usage)

    prompt, prompt_total = total("prompt_layers_computed"), total("prompt_layers_total")
    decode, decode_total = total("layers_computed") - prompt, total("layers_total") - prompt_total
    tokens = total("completion_tokens")
    return {"texts": texts, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "decode_saved": 1 - decode / decode_total, "prompt_saved": 1 - prompt / prompt_total}  # fmt: skip


def rounds(name: str, run, args) -> dict:
    """Interleaved rounds of both settings; per-round ratios of tok/s (exits over full depth)."""
    settings = {"full depth": FULL, "exits": json.loads(args.exit)}
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for s, exit in settings.items():
            runs[s].append(run(exit))
            last = runs[s][-1]
            log(f"{name} round {r + 1}, {s}: {last['tokens']} tokens, {last['tok_s']:.1f} tok/s, decode compute "
                f"saved {last['decode_saved']:.1%}, prompt {last['prompt_saved']:.1%}")  # fmt: skip
    full, default = runs["full depth"], runs["exits"]
    ratios = [d["tok_s"] / f["tok_s"] for f, d in zip(full, default, strict=True)]
    rouge = rouge_l(default[0]["texts"], full[0]["texts"])
    identical = sum(a == b for a, b in zip(full[0]["texts"], default[0]["texts"], strict=True))
    return {
        s: {"tok_s": [round(x["tok_s"], 2) for x in runs[s]], "tokens": runs[s][0]["tokens"],
            "decode_compute_saved": round(runs[s][0]["decode_saved"], 4),
            "prompt_compute_saved": round(runs[s][0]["prompt_saved"], 4)}
        for s in settings
    } | {"exit_setting": settings["exits"], "speedup_per_round": [round(x, 3) for x in ratios],
         "speedup_median": round(statistics.median(ratios), 3), "rouge_l_against_full": round(rouge, 4),
         "identical_answers": identical}  # fmt: skip


def main(args: argparse.Namespace) -> dict:
    messages = chats(args.prompts)
    report: dict = {"machine": machine(), "chat_prompts": len(messages), "max_tokens": args.max_tokens}
    if "generate" in args.paths:
        engine = Engine.local(EngineConfig(num_layer_groups=1, max_model_len=1024))
        try:
            report["adept generate"] = rounds(
                "adept generate", lambda exit: asyncio.run(in_process(engine, messages, exit, args)), args
            )
        finally:
            asyncio.run(engine.shutdown())
    if "serve" in args.paths:
        config = local_app(args, EngineConfig(num_layer_groups=3, max_model_len=1024))
        server.init_ray(config, num_cpus=os.cpu_count())
        url = f"http://127.0.0.1:{args.http_port}"
        try:
            server.start(config, build_app(config))
            report["adept serve"] = rounds(
                "adept serve", lambda exit: asyncio.run(served(url, config.served_name(), messages, exit, args)), args
            ) | {"concurrency": args.concurrency}
        finally:
            server.stop()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="chat prompts of the report half")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8, help="streams in flight through the server")
    p.add_argument("--exit", default="{}", help="the request's adept exit controls set against full depth, as "
                   "JSON (default {}: the server's default)")  # fmt: skip
    p.add_argument("--paths", nargs="+", choices=["generate", "serve"], default=["generate", "serve"])
    server_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    run_benchmark(main, parse_args())
