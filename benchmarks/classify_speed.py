"""Classification by generation through the server, with prefill exits: SST-2 sentences (the report half of
../shared/data/sst2/dev.tsv) as `Review: ...\\nSentiment (positive or negative):`, one greedy token with its
top log-probabilities (`max_tokens: 1`, `logprobs: 20`), the label read from whether " positive" or
" negative" ranks higher. Only the last prompt position needs the LM head; the others only feed it, so
prompt tokens that exit early save their layers outright. Per exit setting: accuracy, prompt layer
compute saved, and time per request, in interleaved rounds (full depth, setting A, ..., full depth, ...).

    python benchmarks/classify_speed.py --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import time
from pathlib import Path

import httpx
from engine_speed import log, machine  # benchmarks/ is on sys.path
from lm_eval_tasks.adept_tasks import SST2_TUNE
from serve_speed import local_app, run_benchmark, server_options

from serving.app import build_app
from serving.deploy import server
from serving.engine.config import EngineConfig

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "dev.tsv"
FULL = {"policy": "none"}


def _prefill_static(depth: int) -> dict:
    """Prompt tokens exit at `depth` (decoupled back-fill); the last, which samples the label, at full depth."""
    return {"policy": "none", "prefill": {"policy": "static", "max_depth": depth, "backfill": "decoupled",
                                          "full_depth_last": 1}}  # fmt: skip


SETTINGS = {
    "pack default": {},  # the shipped exit pack's tuned controls
    "prefill static 20": _prefill_static(20),
    "prefill static 16": _prefill_static(16),
}
LABELS = (" negative", " positive")


def sentences(part: str) -> list[tuple[str, int]]:
    with SST2.open(newline="") as f:
        rows = [(r["text"].strip(), int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[SST2_TUNE:] if part == "report" else rows[:SST2_TUNE]


async def classify(client: httpx.AsyncClient, url: str, model: str, text: str, exit: dict) -> tuple[int, dict]:
    body = {
        "model": model,
        "prompt": f"Review: {text}\nSentiment (positive or negative):",
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": 20,
        "adept": exit,
    }
    r = await client.post(f"{url}/v1/completions", json=body)
    r.raise_for_status()
    out = r.json()
    top = out["choices"][0]["logprobs"]["top_logprobs"][0]
    scores = [top.get(label, float("-inf")) for label in LABELS]
    return int(scores[1] > scores[0]), out["usage"]


async def run(url: str, model: str, rows: list[tuple[str, int]], exit: dict, concurrency: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        await classify(client, url, model, rows[0][0], exit)  # warm-up
        gate = asyncio.Semaphore(concurrency)

        async def one(text: str) -> tuple[int, dict]:
            async with gate:
                return await classify(client, url, model, text, exit)

        started = time.monotonic()
        results = await asyncio.gather(*(one(text) for text, _ in rows))
        seconds = time.monotonic() - started
    correct = sum(pred == label for (pred, _), (_, label) in zip(results, rows, strict=True))
    computed = sum(u["prompt_layers_computed"] for _, u in results)
    total = sum(u["prompt_layers_total"] for _, u in results)
    return {"accuracy": correct / len(rows), "prompt_saved": 1 - computed / total, "seconds": seconds}


def main(args: argparse.Namespace) -> dict:
    rows = sentences(args.part)[: args.limit]
    config = local_app(args, EngineConfig(num_layer_groups=3, max_model_len=512))
    report: dict = {"machine": machine(), "sentences": len(rows), "part": args.part, "concurrency": args.concurrency}
    server.init_ray(config, num_cpus=os.cpu_count())
    url = f"http://127.0.0.1:{args.http_port}"
    try:
        server.start(config, build_app(config))
        names = ["full depth", *args.settings]
        exits = {"full depth": FULL} | {n: SETTINGS[n] for n in args.settings}
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names:
                runs[name].append(asyncio.run(run(url, config.served_name(), rows, exits[name], args.concurrency)))
                last = runs[name][-1]
                log(f"round {r + 1}, {name}: accuracy {last['accuracy']:.3f}, prompt compute saved "
                    f"{last['prompt_saved']:.1%}, {last['seconds']:.1f} s")  # fmt: skip
        for name in names:
            speedups = [f["seconds"] / s["seconds"] for f, s in zip(runs["full depth"], runs[name], strict=True)]
            report[name] = {
                "exit": exits[name],
                "accuracy": runs[name][0]["accuracy"],
                "prompt_compute_saved": round(runs[name][0]["prompt_saved"], 4),
                "seconds_per_request": round(statistics.median(x["seconds"] for x in runs[name]) / len(rows), 4),
                "speedup_per_round": [round(x, 3) for x in speedups],
                "speedup_median": round(statistics.median(speedups), 3),
            }
    finally:
        server.stop()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["tune", "report"], default="report")
    p.add_argument("--limit", type=int, help="sentences (default: the whole part)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    server_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    run_benchmark(main, parse_args())
