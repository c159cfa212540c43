"""Speculative decoding against full depth, in-process: greedy chat answers of the report half of
../shared/data/chat/instructions.jsonl (chat template applied, a fixed number of tokens each), at 1 and more
concurrent streams, full depth and each speculative setting alternating round by round (the ratio is
taken per round). Per setting: tok/s, the speed-up's median and spread, acceptance (drafts kept / drafted),
and whether every answer is token for token full depth's. Also the cost model: the measured time of a
draft step, of verifying n positions and of a full-depth step (a 200-token cache), the speed-up it allows
at full acceptance and the acceptance at which speculation breaks even, per draft depth.

--model zeroed is a copy of the default model whose layers from the draft depth on add nothing (o_proj and
down_proj zeroed), served without an exit pack: an identity exit at that depth predicts exactly, so every
draft is kept. --hf adds Hugging Face's own self-speculation (generate(assistant_early_exit=d)) on the same
prompts, one at a time, beside its full-depth generate.

    python benchmarks/spec_speed.py --model zeroed --draft-depths 20 --speculative-tokens 4 --streams 1
    python benchmarks/spec_speed.py --model default --draft-depths auto --speculative-tokens 4 --streams 1,8,64
    python benchmarks/spec_speed.py --streams "" --cost-depths 8,12,16,20,24,28 --speculative-tokens 1,2,4,8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from engine_speed import hf_model, log, machine, publish  # benchmarks/ is on sys.path

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.engine.plan import PipelinePlan
from serving.engine.speculative import break_even_acceptance
from workers.corpus import CorpusPart, chat_prompts
from workers.exit_pack import ExitPack
from workers.model_store import DEFAULT_MODEL, resolve_model
from workers.modes import Backfill, Policy
from workers.protocol import Rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import weak_late_layers

CHATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat" / "instructions.jsonl"


async def answers(engine: Engine, prompts: list[list[int]], spec: dict, streams: int, max_tokens: int) -> dict:
    gate = asyncio.Semaphore(streams)
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}

    async def one(prompt: list[int]) -> tuple[list[int], int, int]:
        tokens, last = [], None
        async with gate:
            async for out in engine.generate(prompt, sampling, None, None, spec):
                tokens += out.token_ids
                last = out
        return tokens, last.usage.draft_tokens, last.usage.accepted_tokens

    started = time.monotonic()
    outs = await asyncio.gather(*(one(p) for p in prompts))
    seconds = time.monotonic() - started
    tokens = sum(len(o[0]) for o in outs)
    return {"tokens": [o[0] for o in outs], "tok_s": tokens / seconds, "drafted": sum(o[1] for o in outs),
            "accepted": sum(o[2] for o in outs)}  # fmt: skip


def settings(args: argparse.Namespace) -> dict[str, dict]:
    out = {"full depth": {"num_tokens": 0}}
    for d in args.draft_depths:
        for n in args.speculative_tokens:
            for c in args.min_confidence:
                name = f"draft {d}, {n} tokens" + (f", min confidence {c}" if c else "")
                out[name] = {"num_tokens": n, "draft_depth": d, "min_confidence": c}
    return out


def rounds(engines: dict[int, Engine], prompts: list[list[int]], streams: int, args: argparse.Namespace) -> dict:
    """Interleaved rounds of every setting on every engine (one per --max-inflight-batches value); at least
    as many answers as streams (the prompts repeated). Ratios are against full depth with the first value."""
    prompts = (prompts * -(-streams // len(prompts)))[: max(len(prompts), streams)]
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for inflight, engine in engines.items():
            for name, spec in settings(args).items():
                name += f", {inflight} in flight" if len(engines) > 1 else ""
                run = asyncio.run(answers(engine, prompts, spec, streams, args.max_tokens))
                runs.setdefault(name, []).append(run)
                log(f"{streams} streams, round {r + 1}, {name}: {run['tok_s']:.1f} tok/s, accepted "
                    f"{run['accepted']} of {run['drafted']} drafts")  # fmt: skip
    full = runs.pop(next(iter(runs)))
    report = {"full depth tok/s": [round(f["tok_s"], 2) for f in full]}
    for name, rs in runs.items():
        ratios = [s["tok_s"] / f["tok_s"] for s, f in zip(rs, full, strict=True)]
        drafted, accepted = sum(x["drafted"] for x in rs), sum(x["accepted"] for x in rs)
        report[name] = {
            "tok_s": [round(x["tok_s"], 2) for x in rs],
            "speedup_per_round": [round(x, 3) for x in ratios],
            "speedup_median": round(statistics.median(ratios), 3),
            "speedup_spread": [round(min(ratios), 3), round(max(ratios), 3)],
            "acceptance": round(accepted / drafted, 4) if drafted else None,
            "answers_identical": sum(a == b for x in rs for a, b in zip(x["tokens"], full[0]["tokens"], strict=True)),
            "answers": len(prompts) * len(rs),
        }
    return report


# ---- the cost model ---------------------------------------------------------------------------------


def _rows(
    blocks: list[int], positions: list[int], policy: Policy, depth: int, backfill: Backfill, sample: bool
) -> Rows:
    n = len(positions)

    def full(v, dtype=torch.int64) -> torch.Tensor:
        return torch.full((n,), v, dtype=dtype)

    return Rows(block_table=torch.tensor([blocks] * n), positions=torch.tensor(positions), token_ids=full(100),
                policy=full(int(policy)), threshold=full(0.9, torch.float32), min_depth=full(1), max_depth=full(depth),
                backfill=full(int(backfill)), sample=full(sample, torch.bool), temperature=full(0.0, torch.float32),
                top_p=full(1.0, torch.float32), top_k=full(0), seed=full(0), logprobs=full(-1), target=full(-1),
                prompt=full(False, torch.bool))  # fmt: skip


def cost_model(engine: Engine, depths: list[int], max_tokens: list[int], reps: int = 20) -> dict:
    """Median times (ms) with a 200-token cache: a full-depth step, a draft step to each depth (with and
    without the exit head), verifying n positions past it; what they allow."""
    context, most = 200, max(max_tokens) + 1
    blocks = engine.scheduler.pool.allocate(-(-(context + most) // engine.config.block_size))
    pipe, layers = engine.pipeline, engine.plan.num_layers
    hidden = torch.randn(most, engine.arch.hidden_size) * 0.5

    def timed(rows: Rows, depth: int = 0) -> float:
        async def once() -> float:
            t = time.perf_counter()
            await pipe.collect(pipe.submit(rows, None, hidden[: len(rows)] if depth else None, depth))
            return time.perf_counter() - t

        async def all_reps() -> list[float]:
            return [await once() for _ in range(reps)]

        return statistics.median(asyncio.run(all_reps())) * 1000

    timed(_rows(blocks, list(range(context + most)), Policy.NONE, layers, Backfill.EXACT, False))  # fill the cache
    full = timed(_rows(blocks, [context], Policy.NONE, layers, Backfill.EXACT, True))
    report: dict = {"full_step_ms": round(full, 2), "per_depth": {}}
    for d in depths:
        draft = timed(_rows(blocks, [context], Policy.STATIC, d, Backfill.DRAFT, True))
        feed = timed(_rows(blocks, [context], Policy.STATIC, d, Backfill.DRAFT, False))
        per_k = {}
        for k in max_tokens:
            verify = timed(_rows(blocks, list(range(context, context + k + 1)), Policy.NONE, layers, Backfill.EXACT,
                                 True), depth=d)  # fmt: skip
            round_ms = k * draft + feed + verify
            per_k[k] = {"verify_ms": round(verify, 2), "round_ms": round(round_ms, 2),
                        "limit_speedup": round((k + 1) * full / round_ms, 3),
                        "break_even_acceptance": _rounded(break_even_acceptance(k, round_ms / full))}  # fmt: skip
        report["per_depth"][d] = {"draft_step_ms": round(draft, 2), "feed_step_ms": round(feed, 2), "per_k": per_k}
    engine.scheduler.pool.free(blocks)
    asyncio.run(_confirm(pipe.free(blocks)))
    return report


async def _confirm(calls) -> None:
    from serving.engine.pipeline import Pipeline

    await Pipeline.confirm(calls)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# ---- Hugging Face's self-speculation ----------------------------------------------------------------


def hf_rounds(path: Path, prompts: list[list[int]], depths: list[int], args: argparse.Namespace) -> dict:
    model = hf_model(path)
    runs: dict[str, list[float]] = {"full depth": [], **{f"assistant_early_exit={d}": [] for d in depths}}
    same: dict[str, int] = {}
    reference = None
    for _ in range(args.rounds):
        for name in runs:
            kw = {} if name == "full depth" else {"assistant_early_exit": int(name.split("=")[1])}
            tokens, outs, started = 0, [], time.monotonic()
            for p in prompts:
                with torch.no_grad():
                    out = model.generate(torch.tensor([p]), max_new_tokens=args.max_tokens, do_sample=False, **kw)
                outs.append(out[0, len(p) :].tolist())
                tokens += len(outs[-1])
            runs[name].append(tokens / (time.monotonic() - started))
            reference = reference or outs
            same[name] = sum(a == b for a, b in zip(outs, reference, strict=True))
            log(f"Hugging Face, {name}: {runs[name][-1]:.1f} tok/s")
    full = runs["full depth"]
    return {name: {"tok_s": [round(x, 2) for x in r],
                   "against_full": round(statistics.median([x / f for x, f in zip(r, full, strict=True)]), 3),
                   "answers_identical": same[name]} for name, r in runs.items()}  # fmt: skip


def ray_engine(config: EngineConfig, name: int, args: argparse.Namespace) -> Engine:
    """The engine calling its layer groups as Ray actors (a process each, as `adept serve` places them),
    on a local Ray started here."""
    import ray

    from serving.config import AppConfig
    from serving.deploy.ray_groups import ray_groups

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})

    def make_groups(_path: Path, plan: PipelinePlan, _pack: ExitPack | None) -> list:
        bundle = AppConfig(engine=config).worker_bundle(False)
        return ray_groups(config, plan, bundle, args.worker_threads, lambda i: f"spec-{name}-group-{i}", 0)

    return Engine.build(config, make_groups)


def main(args: argparse.Namespace) -> dict:
    path = resolve_model(DEFAULT_MODEL)
    pack = "auto"
    if args.model == "zeroed":
        path = weak_late_layers(path, Path(args.workdir) / f"zeroed-{min(args.draft_depths)}", 0.0,
                                min(args.draft_depths))  # fmt: skip
        pack = "none"
    bounds = args.layer_boundaries
    engines = {}
    for inflight in args.max_inflight_batches:
        config = EngineConfig(
            model=DEFAULT_MODEL if args.model == "default" else str(path),  # by name: its shipped pack loads
            exit_pack=pack,
            num_layer_groups=len(bounds) + 1 if bounds else 3,
            layer_boundaries=bounds or None,
            max_model_len=1024,
            max_num_seqs=max(args.streams, default=8),
            speculative_adaptive=not args.fixed,
            speculative_max_batch=args.max_batch,
            max_inflight_batches=inflight,
        )
        engines[inflight] = Engine.local(config) if args.groups == "local" else ray_engine(config, inflight, args)
    engine = next(iter(engines.values()))
    messages = list(chat_prompts(CorpusPart.of(str(CHATS), (0.5, 1.0))))[: args.prompts]
    prompts = [engine.chat_prompt(m) for m in messages]
    report: dict = {"machine": machine(), "model": args.model, "exit_pack": engine.pack is not None,
                    "layer_boundaries": [g.start for g in engine.plan.groups[1:]],
                    "adaptive": not args.fixed, "draft_vocab_size": engine.config.draft_vocab_size,
                    "max_inflight_batches": args.max_inflight_batches, "groups": args.groups,
                    "chat_prompts": len(prompts), "max_tokens": args.max_tokens, "rounds": args.rounds}  # fmt: skip
    try:
        depths = args.cost_depths or [d for d in args.draft_depths if d != "auto"]
        report["cost_model"] = cost_model(engine, depths, args.speculative_tokens)
        report["auto_draft_depth"] = {k: engine.admission.auto_depth(k) for k in args.speculative_tokens}
        log(f"cost model: {report['cost_model']}")
        for streams in args.streams:
            report[f"{streams} streams"] = rounds(engines, prompts, streams, args)
    finally:
        for e in engines.values():
            asyncio.run(e.shutdown())
    if args.hf:
        auto = report["auto_draft_depth"][max(args.speculative_tokens)]  # Hugging Face at the depth 'auto' picks
        depths = sorted({auto if d == "auto" else d for d in args.draft_depths})
        report["hugging face, 1 stream"] = hf_rounds(path, prompts, depths, args)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["default", "zeroed"], default="default")
    p.add_argument("--draft-depths", default="20", help="comma-separated depths or 'auto'")
    p.add_argument("--layer-boundaries", default="", help="comma-separated (default: the server's 3 groups)")
    p.add_argument("--cost-depths", default="", help="the cost model's depths (default: the draft depths)")
    p.add_argument("--min-confidence", default="0", help="comma-separated: rounds stop at less confident drafts")
    p.add_argument("--speculative-tokens", default="4", help="comma-separated drafts per round")
    p.add_argument("--streams", default="1", help="comma-separated concurrent streams ('': the cost model only)")
    p.add_argument("--prompts", type=int, default=6, help="chat prompts of the report half")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch", type=int, help="engine.speculative_max_batch (default: the engine's)")
    p.add_argument(
        "--max-inflight-batches",
        default="1",
        help="comma-separated micro-batches in the pipeline at once (an engine each, interleaved)",
    )
    p.add_argument(
        "--groups",
        choices=["local", "ray"],
        default="local",
        help="layer groups in this process (a thread each) or as Ray actors (a process each)",
    )
    p.add_argument("--worker-threads", type=int, help="with --groups ray: torch threads per worker (default Ray's)")
    p.add_argument("--fixed", action="store_true", help="draft num_tokens every round (no stepping aside)")
    p.add_argument("--hf", action="store_true", help="also Hugging Face's assistant_early_exit, 1 stream")
    p.add_argument("--workdir", default="/tmp/adept-spec-speed", help="where the zeroed copy is written")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    args.draft_depths = [x if x == "auto" else int(x) for x in args.draft_depths.split(",")]
    args.speculative_tokens = [int(x) for x in args.speculative_tokens.split(",")]
    args.streams = [int(x) for x in args.streams.split(",") if x]
    args.layer_boundaries = [int(x) for x in args.layer_boundaries.split(",") if x]
    args.cost_depths = [int(x) for x in args.cost_depths.split(",") if x]
    args.min_confidence = [float(x) for x in args.min_confidence.split(",")]
    args.max_inflight_batches = [int(x) for x in args.max_inflight_batches.split(",")]
    return args


if __name__ == "__main__":
    parsed = parse_args()
    publish(main(parsed), parsed.json)
