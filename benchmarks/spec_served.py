"""Speculative decoding through `adept serve`'s HTTP endpoint (the application on a local Ray, three layer
groups): greedy chat answers of the report half of ../shared/data/chat/instructions.jsonl, a fixed number
of tokens each (ignore_eos).

1. identity: every prompt at full depth and speculatively, at each of --identity-streams concurrent
   streams; the answers' token ids compared (any difference is reported with its prompt and position).
2. a worker lost: the speculative answers again at the last of those levels while the middle layer
   group's worker is killed (SIGKILL) once the streams are under way; Ray restarts it, the pipeline rebuilds
   the caches, and the answers must still be full depth's.
3. speed: full depth and speculative alternating round by round at each of --streams (as many prompts as
   streams, at least --prompts), the ratio taken per round; acceptance from usage.

    python benchmarks/spec_served.py --identity-streams 1,8 --streams 1,8,64 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import time
from pathlib import Path

import httpx
from engine_speed import log, machine  # benchmarks/ is on sys.path
from ray import serve
from serve_speed import local_app, run_benchmark, server_options

from serving.app import build_app
from serving.config import APP_NAME
from serving.deploy import server
from serving.engine.config import EngineConfig
from workers.corpus import CorpusPart, chat_prompts

CHATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat" / "instructions.jsonl"
FULL = {"policy": "none"}


async def answers(url: str, model: str, chats: list, adept: dict, streams: int, tokens: int) -> dict:
    """Every chat answered, `streams` at a time: token ids per answer, tok/s, drafts and kept drafts."""
    gate = asyncio.Semaphore(streams)
    async with httpx.AsyncClient(timeout=900) as client:

        async def one(messages: list[dict]) -> dict:
            body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0,
                    "ignore_eos": True, "adept": adept}  # fmt: skip
            async with gate:
                r = await client.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()

        started = time.monotonic()
        outs = await asyncio.gather(*(one(m) for m in chats), return_exceptions=True)
        seconds = time.monotonic() - started
    ok = [o for o in outs if isinstance(o, dict)]
    return {
        "ids": [o["adept"]["token_ids"] if isinstance(o, dict) else None for o in outs],
        "errors": [repr(o) for o in outs if not isinstance(o, dict)],
        "tok_s": sum(o["usage"]["completion_tokens"] for o in ok) / seconds,
        "drafted": sum(o["usage"]["draft_tokens"] for o in ok),
        "accepted": sum(o["usage"]["accepted_tokens"] for o in ok),
    }


def compare(full: list, spec: list) -> dict:
    """Answers identical token for token; for the others, where they part."""
    differ = [
        {"prompt": i, "position": next((j for j, (a, b) in enumerate(zip(f, s, strict=False)) if a != b), None)}
        for i, (f, s) in enumerate(zip(full, spec, strict=True))
        if f != s
    ]
    return {"answers": len(full), "identical": len(full) - len(differ), "differences": differ}


async def killed_mid_stream(url: str, model: str, chats: list, spec: dict, streams: int, tokens: int) -> dict:
    """The speculative answers with the middle group's worker killed once `streams` answers are under way."""
    replica = serve.get_deployment_handle("PipelineReplica", APP_NAME)
    victim = (await replica.workers.remote())[1]
    task = asyncio.create_task(answers(url, model, chats, {"speculative": spec}, streams, tokens))
    await asyncio.sleep(5.0)  # the first streams are well under way (prompts read, rounds drafting)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    run = await task
    after = (await replica.workers.remote())[1]
    return run | {"victim_pid": victim["pid"], "restarted_pid": after["pid"], "killed_after_s": 5.0,
                  "finished_s_after_kill": round(time.monotonic() - killed_at, 1)}  # fmt: skip


def speed(url: str, model: str, chats: list, spec: dict, args: argparse.Namespace) -> dict:
    report = {}
    for streams in args.streams:
        level = (chats * -(-streams // len(chats)))[: max(len(chats), streams)]
        runs: dict[str, list[dict]] = {"full depth": [], "speculative": []}
        for r in range(args.rounds):
            for name, adept in (("full depth", FULL), ("speculative", {"speculative": spec})):
                runs[name].append(asyncio.run(answers(url, model, level, adept, streams, args.max_tokens)))
                last = runs[name][-1]
                log(f"{streams} streams, round {r + 1}, {name}: {last['tok_s']:.1f} tok/s, kept {last['accepted']} "
                    f"of {last['drafted']} drafts")  # fmt: skip
        ratios = [s["tok_s"] / f["tok_s"] for f, s in zip(runs["full depth"], runs["speculative"], strict=True)]
        drafted = sum(x["drafted"] for x in runs["speculative"])
        report[f"{streams} streams"] = {
            "answers": len(level),
            "full_tok_s": [round(x["tok_s"], 2) for x in runs["full depth"]],
            "speculative_tok_s": [round(x["tok_s"], 2) for x in runs["speculative"]],
            "speedup_per_round": [round(x, 3) for x in ratios],
            "speedup_median": round(statistics.median(ratios), 3),
            "speedup_spread": [round(min(ratios), 3), round(max(ratios), 3)],
            "acceptance": round(sum(x["accepted"] for x in runs["speculative"]) / drafted, 4) if drafted else None,
            "drafted": drafted,
            "identical": compare(runs["full depth"][0]["ids"], runs["speculative"][0]["ids"])["identical"],
        }
    return report


def main(args: argparse.Namespace) -> dict:
    chats = list(chat_prompts(CorpusPart.of(str(CHATS), (0.5, 1.0))))
    spec = {"num_tokens": args.speculative_tokens, "draft_depth": args.draft_depth}
    engine = EngineConfig(num_layer_groups=3, max_model_len=1024, max_num_seqs=max([*args.streams, 8]))
    config = local_app(args, engine)
    report: dict = {"machine": machine(), "speculative": spec, "max_tokens": args.max_tokens,
                    "report_half_prompts": len(chats)}  # fmt: skip
    server.init_ray(config, num_cpus=os.cpu_count())
    url, model = f"http://127.0.0.1:{args.http_port}", config.served_name()
    try:
        server.start(config, build_app(config))
        if args.identity_streams:
            identity = report["identity"] = {}
            for streams in args.identity_streams:
                full = asyncio.run(answers(url, model, chats, FULL, streams, args.max_tokens))
                fast = asyncio.run(answers(url, model, chats, {"speculative": spec}, streams, args.max_tokens))
                identity[f"{streams} streams"] = compare(full["ids"], fast["ids"]) | {
                    "drafted": fast["drafted"], "accepted": fast["accepted"], "errors": full["errors"] + fast["errors"]
                }  # fmt: skip
                log(f"identity, {streams} streams: {json.dumps(identity[f'{streams} streams'])}")
            streams = args.identity_streams[-1]
            run = asyncio.run(killed_mid_stream(url, model, chats, spec, streams, args.max_tokens))
            report["worker killed"] = compare(full["ids"], run.pop("ids")) | run | {"streams": streams}
            log(f"worker killed: {json.dumps(report['worker killed'])}")
        report["speed"] = speed(url, model, chats[: args.prompts], spec, args)
    finally:
        server.stop()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speculative-tokens", type=int, default=4)
    p.add_argument("--draft-depth", default="auto", help="a depth, or 'auto'")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--identity-streams", default="1,8", help="comma-separated ('': skip identity and the kill)")
    p.add_argument("--streams", default="1,8,64", help="comma-separated concurrent streams of the speed rounds")
    p.add_argument("--prompts", type=int, default=8, help="prompts of the speed rounds at least")
    p.add_argument("--rounds", type=int, default=3)
    server_options(p)
    args = p.parse_args(argv)
    args.draft_depth = args.draft_depth if args.draft_depth == "auto" else int(args.draft_depth)
    args.identity_streams = [int(x) for x in args.identity_streams.split(",") if x]
    args.streams = [int(x) for x in args.streams.split(",") if x]
    return args


if __name__ == "__main__":
    run_benchmark(main, parse_args())
