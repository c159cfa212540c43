"""The LM head on the CPU: `F.linear` against `workers.layers.head_logits` (weight @ x.T over at least two
rows) for the few rows of decode and verification steps, on the default model's head (49,152 x 576,
float32; its first 16,384 rows: the speculative drafts' head), interleaved rounds, median ms per call.

    python benchmarks/head_speed.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from engine_speed import log, machine, publish  # benchmarks/ is on sys.path

from workers.layers import head_logits
from workers.model_store import DEFAULT_MODEL, load_tensors, resolve_model


def timed(fn, reps: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps * 1000


def main(args: argparse.Namespace) -> dict:
    weights = load_tensors(resolve_model(DEFAULT_MODEL), lambda n: n == "model.embed_tokens.weight", torch.float32)
    head = weights["model.embed_tokens.weight"]  # tied: the LM head
    report: dict = {"machine": machine("cpu"), "head": list(head.shape), "rounds": args.rounds}
    for vocab in (head.shape[0], 16384):
        w = head[:vocab]
        rows = {}
        for n in args.rows:
            x = torch.randn(n, head.shape[1])
            assert torch.allclose(head_logits(x, w), F.linear(x, w), atol=1e-3)
            times: dict[str, list[float]] = {"F.linear": [], "head_logits": []}
            for _ in range(args.rounds):
                times["F.linear"].append(timed(lambda x=x, w=w: F.linear(x, w), args.reps))
                times["head_logits"].append(timed(lambda x=x, w=w: head_logits(x, w), args.reps))
            ratios = [a / b for a, b in zip(times["F.linear"], times["head_logits"], strict=True)]
            rows[n] = {k: round(statistics.median(v), 2) for k, v in times.items()} | {
                "speedup_median": round(statistics.median(ratios), 2),
                "speedup_spread": [round(min(ratios), 2), round(max(ratios), 2)],
            }
            log(f"vocab {vocab}, {n} rows: {rows[n]}")
        report[f"vocab {vocab}"] = rows
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", help="also write the report here")
    return p.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args()
    publish(main(parsed), parsed.json)
