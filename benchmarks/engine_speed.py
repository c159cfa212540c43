"""Engine speed and early-exit quality on one machine.

1. Full depth (policy none): the engine against Hugging Face `generate` on the same prompts, greedy, at 1
   request at a time and at N concurrent requests (HF: one left-padded batch of N).
2. Policy confidence with decoupled back-fill at several thresholds: tokens/s, mean exit depth, agreement
   with full depth teacher-forced on held-out wikitext and free-running on chat prompts.

    python benchmarks/engine_speed.py                      # the default model, the full run (~10 min on 2 cores)
    python benchmarks/engine_speed.py --quick --json out.json
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

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from serving.config import EngineConfig
from serving.engine import Engine
from serving.evaluation import agreement, common_prefix, teacher_forced
from workers.model_store import DEFAULT_MODEL, load_tokenizer, resolve_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "The most important invention of the twentieth century was",
    "To make a cup of tea, first",
    "In machine learning, overfitting means",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a black hole is in one paragraph.",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
]
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- Hugging Face reference -------------------------------------------------------------------------


def hf_model(path: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, like the engine's requests here
    model.generation_config.pad_token_id = 0
    return model


def hf_speed(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int, batch: int) -> float:
    """Greedy tokens/s of HF generate, `batch` prompts per call (left-padded)."""

    def generate(group: list[list[int]]) -> int:
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False)
        return (out.shape[1] - width) * len(group)

    generate(prompts[:batch])  # warm-up
    started, tokens = time.perf_counter(), 0
    for i in tqdm(range(0, len(prompts), batch), desc=f"HF generate, batch {batch}", leave=False):
        tokens += generate(prompts[i : i + batch])
    return tokens / (time.perf_counter() - started)


# ---- the engine -------------------------------------------------------------------------------------


async def engine_run(
    engine: Engine, prompts: list[list[int]], max_tokens: int, concurrency: int, exit: dict
) -> tuple[float, list[list[int]], list[int]]:
    """Greedy generation of every prompt, `concurrency` requests at a time: (tokens/s, tokens, exit depths)."""
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    results: list[list[int]] = [[] for _ in prompts]
    depths: list[int] = []
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(prompts), desc=f"engine {exit.get('policy')}, {concurrency} concurrent", leave=False)

    async def one(i: int) -> None:
        async with gate:
            async for out in engine.generate(prompts[i], sampling, exit):
                results[i] += out.token_ids
                depths.extend(out.exit_layers)
        bar.update()

    await engine_warmup(engine, prompts[0], exit)
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    elapsed = time.perf_counter() - started
    bar.close()
    return sum(map(len, results)) / elapsed, results, depths


async def engine_warmup(engine: Engine, prompt: list[int], exit: dict) -> None:
    async for _ in engine.generate(prompt, {"max_tokens": 4, "temperature": 0.0}, exit):
        pass


def wikitext_windows(tokenizer, count: int, length: int) -> list[list[int]] | None:
    """`count` windows of `length` tokens, spread over the held-out text."""
    if not WIKITEXT.is_file():
        return None
    text = WIKITEXT.read_text()
    step = len(text) // count
    windows = []
    for i in range(count):
        ids = tokenizer.encode(text[i * step : i * step + length * 8], add_special_tokens=False)
        windows.append(ids[:length])
    return windows


async def main(args: argparse.Namespace) -> dict:
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    chats = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for c in CHAT_PROMPTS
    ]
    report: dict = {
        "model": args.model,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}",
        "max_tokens": args.max_tokens,
        "prompts": len(prompts),
    }
    engine = Engine.local(
        EngineConfig(model=args.model, num_layer_groups=args.layer_groups, max_num_seqs=max(args.concurrency, 2))
    )
    report["num_layers"] = engine.plan.num_layers
    report["exit_points"] = list(engine.plan.exit_points)
    full = {"policy": "none"}

    log(f"[1/2] full depth vs HF generate ({len(prompts)} prompts x {args.max_tokens} tokens)")
    speed = {}
    model = hf_model(path)
    for n in (1, args.concurrency):
        hf = hf_speed(model, prompts, args.max_tokens, n)
        mine, _, _ = await engine_run(engine, prompts, args.max_tokens, n, full)
        speed[n] = {
            "hf_tokens_per_s": round(hf, 1),
            "engine_tokens_per_s": round(mine, 1),
            "ratio": round(mine / hf, 2),
        }
        log(f"  {n} concurrent: HF {hf:.1f} tok/s, engine {mine:.1f} tok/s ({mine / hf:.2f}x)")
    report["full_depth"] = speed
    del model

    log("[2/2] confidence exit with decoupled back-fill")
    windows = wikitext_windows(tokenizer, args.windows, args.window_tokens)
    if windows is None:
        log(f"  {WIKITEXT} is missing: teacher-forced agreement is skipped")
    reference_tf = [await teacher_forced(engine, w, full) for w in windows or []]
    _, reference_chat, _ = await engine_run(engine, chats, args.chat_tokens, args.concurrency, full)
    rows = []
    for threshold in args.thresholds:
        exit = {"policy": "confidence", "threshold": threshold, "backfill": "decoupled"}
        tps = {}
        for n in (1, args.concurrency):
            tps[n], _, depths = await engine_run(engine, prompts, args.max_tokens, n, exit)
        row = {
            "threshold": threshold,
            "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
            "mean_exit_depth_generated": round(statistics.fmean(depths), 2),
        }
        if windows:
            tf = [await teacher_forced(engine, w, exit) for w in windows]
            row["teacher_forced_agreement"] = round(
                statistics.fmean(
                    agreement(t.predictions, r.predictions) for t, r in zip(tf, reference_tf, strict=True)
                ),
                3,
            )
            row["teacher_forced_mean_depth"] = round(float(torch.cat([t.exit_depths for t in tf]).float().mean()), 2)
        _, chat_out, chat_depths = await engine_run(engine, chats, args.chat_tokens, args.concurrency, exit)
        row["free_running_agreement"] = round(
            statistics.fmean(agreement(a, b) for a, b in zip(chat_out, reference_chat, strict=True)), 3
        )
        row["free_running_common_prefix"] = round(
            statistics.fmean(common_prefix(a, b) for a, b in zip(chat_out, reference_chat, strict=True)), 1
        )
        row["free_running_mean_depth"] = round(statistics.fmean(chat_depths), 2)
        rows.append(row)
        log(f"  threshold {threshold}: {json.dumps(row)}")
    report["confidence_decoupled"] = rows
    await engine.shutdown()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--layer-groups", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per speed prompt")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--windows", type=int, default=4, help="wikitext windows for teacher-forced agreement")
    p.add_argument("--window-tokens", type=int, default=256)
    p.add_argument("--chat-tokens", type=int, default=48, help="new tokens per free-running chat prompt")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer tokens, one threshold")
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.thresholds, args.windows, args.window_tokens, args.chat_tokens = 8, [0.7], 1, 64, 8
    return args


if __name__ == "__main__":
    args = parse_args()
    report = asyncio.run(main(args))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
