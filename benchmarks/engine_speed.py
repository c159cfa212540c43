"""Engine speed on one machine.

1. Full depth (policy none): the engine against Hugging Face `generate` on the same prompts, greedy, at 1
   request at a time and at N concurrent requests (HF: one left-padded batch of N).
2. Early exit (the shipped exit pack's default, learned, and other policies): tokens/s against full depth,
   mean exit depth, and how far the greedy text agrees with full depth's. Quality on held-out text, swept
   over policies and thresholds, is `adept eval`'s job.

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

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.quality.evaluation import agreement, common_prefix
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
# Exit controls compared with full depth ({} takes the engine's defaults: the shipped pack's tuned ones).
EXITS = {
    "pack default (learned)": {},
    "learned 0.3, mapped": {"policy": "learned", "threshold": 0.3, "backfill": "mapped"},
    "confidence 0.9, decoupled": {"policy": "confidence", "threshold": 0.9, "backfill": "decoupled"},
}


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


async def main(args: argparse.Namespace) -> dict:
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    report: dict = {
        "model": args.model,
        "machine": machine(),
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

    log("[2/2] early exit: the shipped exit pack's default (learned router) and other policies")
    _, reference, _ = await engine_run(engine, prompts, args.max_tokens, args.concurrency, full)
    rows = []
    for name, exit in EXITS.items():
        tps = {}
        for n in (1, args.concurrency):
            tps[n], out, depths = await engine_run(engine, prompts, args.max_tokens, n, exit)
        row = {
            "exit": name,
            "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
            "speedup_vs_full": {n: round(v / speed[n]["engine_tokens_per_s"], 2) for n, v in tps.items()},
            "mean_exit_depth": round(statistics.fmean(depths), 2),
            "agreement_with_full": round(
                statistics.fmean(agreement(a, b) for a, b in zip(out, reference, strict=True)), 3
            ),
            "common_prefix_with_full": round(
                statistics.fmean(common_prefix(a, b) for a, b in zip(out, reference, strict=True)), 1
            ),
        }
        rows.append(row)
        log(f"  {name}: {json.dumps(row)}")
    report["early_exit"] = rows
    await engine.shutdown()
    return report


def engine_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every in-process engine benchmark takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--layer-groups", type=int, default=1)
    p.add_argument("--json", help="also write the report to this file")
    return p


def machine(device: str | None = None) -> str:
    """What a report was measured on."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {device}"
    )


def publish(report: dict, path: str | None) -> None:
    """The report on stdout, and in `path` if given."""
    print(json.dumps(report, indent=2))
    if path:
        Path(path).write_text(json.dumps(report, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = engine_parser(__doc__)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per speed prompt")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 tokens per prompt")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens = 8
    return args


if __name__ == "__main__":
    args = parse_args()
    publish(asyncio.run(main(args)), args.json)
