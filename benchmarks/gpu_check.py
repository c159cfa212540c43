"""GPU check: the in-process engine on a Llama-3-8B-shaped model with random weights, on one GPU (~5 min).

1. Full depth (policy none) against Hugging Face `generate` on the same weights: tokens/s at 1 and at N
   concurrent requests (HF: one left-padded batch of N), and greedy parity (the engine's greedy ids against
   HF's, each prompt alone in HF; prompts are random token ids).
2. Static exits at 1/4, 1/2 and 3/4 of the layers (back-fill decoupled) and a heterogeneous batch (those
   depths in turn, request by request): speed-up over full depth against two bounds, compute
   (num_layers / mean exit depth) and weight reads (num_layers / the mean over steps of the deepest row's
   depth; rows run c at a time). For one static depth d both are num_layers / d.
3. Four layer groups (in-process threads, no Ray) with a static exit at 1/4 depth: asynchronous against
   synchronous back-fill.
4. Speculative decoding on a copy of the model whose layers from 3/4 depth on add nothing (their o_proj and
   down_proj zeroed, so the identity head there drafts exactly full depth's token): 4 identity-head drafts
   a round from 3/4 depth, with the engine's default cost model (which drafts only where it pays) and
   drafting every round, against full depth on the same copy; the tokens must be full depth's.

Speeds are ratios from interleaved rounds (A, B, A, B, ...): the median ratio and its min/max. Progress goes
to stderr, the JSON report to stdout (and --json PATH). `--tiny` is the CPU mode for CI (tests/test_gpu_check.py):

    python benchmarks/gpu_check.py --tiny --device cpu

On the GPU machine (the device tool's `run`, in a copy of the repository root): it has torch, transformers,
tokenizers, safetensors, numpy, tqdm, grpcio and pyyaml, and no Ray; serving.engine also needs pydantic,
pydantic-core, pydantic-settings, python-dotenv, typing-inspection, annotated-types, typing-extensions (a
recent one, for pydantic-core) and opentelemetry-api, carried as wheels. Once, here, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
        typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0 opentelemetry-api==1.45.2

then `run` with carry [".whl"] and timeout_s 420 (if that is tight: --layers 16, or --rounds 1):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; \
        python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from engine_speed import engine_warmup, hf_speed, log, machine, publish  # benchmarks/ is on sys.path
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.quality.evaluation import common_prefix
from workers.device import resolve_dtype

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROPE = {"rope_type": "default", "rope_theta": 500000.0}
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=512,
)  # fmt: skip
# Per mode: prompt_len, max_tokens, concurrency, alone (prompts run one at a time), parity_prompts, rounds.
SIZES = {"gpu": (32, 32, 32, 4, 8, 2), "tiny": (8, 8, 32, 2, 32, 2)}
FULL = {"policy": "none"}


@dataclass
class Run:
    tokens_per_s: float
    tokens: list[list[int]] = field(default_factory=list)
    depths: list[list[int]] = field(default_factory=list)  # per request, each token's exit depth
    drafted: int = 0  # speculative decoding: tokens drafted, and kept
    accepted: int = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def static(depth: int) -> dict:
    return {"policy": "static", "max_depth": depth, "backfill": "decoupled"}


# ---- the model --------------------------------------------------------------------------------------


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    """A Llama with random weights, made on the device. As in tests/conftest.py, larger weights than the
    usual init (2/sqrt(hidden); 1 for the embeddings and the LM head) make greedy choices decisive."""
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, rope_parameters=ROPE, rms_norm_eps=1e-5, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                vocab = name.endswith(("embed_tokens.weight", "lm_head.weight"))
                p.normal_(0, 1.0 if vocab else 2 / config.hidden_size**0.5)
    model.generation_config.eos_token_id = None  # ignore EOS, like the engine's requests here
    model.generation_config.pad_token_id = 0
    return model


def zero_late_layers(model: LlamaForCausalLM, first: int) -> None:
    """Layers from `first` on add nothing to the residual stream: an identity exit at `first` is exact."""
    with torch.no_grad():
        for layer in model.model.layers[first:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def save_model(model: LlamaForCausalLM, path: Path) -> None:
    """Safetensors weights and a word-level tokenizer ("t0" ... "tN"; the engine needs one, prompts are ids)."""
    model.save_pretrained(path)
    words = Tokenizer(WordLevel({f"t{i}": i for i in range(model.config.vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(path)


def workdir(model_bytes: int) -> tempfile.TemporaryDirectory:
    """/dev/shm when it has room (the 8B shape writes two copies of 16 GB), else the usual temp folder."""
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and shutil.disk_usage(shm).free > 3 * model_bytes
    return tempfile.TemporaryDirectory(prefix="gpu-check-", dir=shm if roomy else None)


class InputsToDevice(torch.nn.Module):
    """The model as engine_speed.hf_speed calls it: that makes its input ids on the CPU; generate() moves
    them to the model's device (a torch.device context would tax every torch call HF makes)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def generate(self, **kw: Any) -> torch.Tensor:
        moved = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        return self.model.generate(**moved)


def hf_greedy(model: LlamaForCausalLM, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


# ---- measuring --------------------------------------------------------------------------------------


async def engine_tps(
    engine: Engine, prompts: list[list[int]], exits: list[dict | None], max_tokens: int, concurrency: int,
    speculative: dict | None = None,
) -> Run:  # fmt: skip
    """Greedy generation of every prompt (each with its own exit controls), `concurrency` at a time."""
    device = torch.device(engine.config.device)
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    run = Run(0.0, [[] for _ in prompts], [[] for _ in prompts])
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            async for out in engine.generate(prompts[i], sampling, exits[i], None, speculative):
                run.tokens[i] += out.token_ids
                run.depths[i] += out.exit_layers
                if out.finished:
                    run.drafted += out.usage.draft_tokens
                    run.accepted += out.usage.accepted_tokens

    await engine_warmup(engine, prompts[0], exits[0])
    await settle(engine, device)
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    sync(device)
    run.tokens_per_s = sum(map(len, run.tokens)) / (time.perf_counter() - started)
    await settle(engine, device)  # trailing back-fills end before the next measurement starts
    return run


async def settle(engine: Engine, device: torch.device) -> None:
    await engine.drain()
    await engine.pipeline.drain()
    sync(device)


async def interleaved(
    measures: dict[str, Callable[[], Awaitable[Run]]], base: str, rounds: int
) -> tuple[dict[str, dict], dict[str, Run]]:
    """Every measure once per round, in turn; each one's tokens/s (median) and, per round, its ratio to
    `base` (median, min, max). Also each measure's last run."""
    speeds: dict[str, list[float]] = {name: [] for name in measures}
    last: dict[str, Run] = {}
    for r in range(rounds):
        for name, measure in measures.items():
            last[name] = await measure()
            speeds[name].append(last[name].tokens_per_s)
            log(f"    round {r + 1}: {name}: {last[name].tokens_per_s:.1f} tok/s")
    table: dict[str, dict] = {}
    for name, values in speeds.items():
        table[name] = {"tokens_per_s": round(statistics.median(values), 1)}
        if name != base:
            ratios = [v / b for v, b in zip(values, speeds[base], strict=True)]
            table[name] |= {
                "ratio": round(statistics.median(ratios), 3),
                "ratio_min": round(min(ratios), 3),
                "ratio_max": round(max(ratios), 3),
            }
    return table, last


def parity(engine_tokens: list[list[int]], hf_tokens: list[list[int]]) -> dict:
    pairs = list(zip(engine_tokens, hf_tokens, strict=False))
    return {
        "prompts": len(pairs),
        "matching": sum(a == b for a, b in pairs),
        "mean_common_prefix": round(statistics.fmean(common_prefix(a, b) for a, b in pairs), 2),
    }


def bounds(num_layers: int, depths: list[int], concurrency: int) -> dict:
    """Speed-up bounds of requests exiting at `depths`, `concurrency` rows per step."""
    deepest = [max(depths[i : i + concurrency]) for i in range(0, len(depths), concurrency)]
    return {
        "compute_bound": round(num_layers / statistics.fmean(depths), 3),
        "weight_read_bound": round(num_layers / statistics.fmean(deepest), 3),
    }


# ---- the check --------------------------------------------------------------------------------------


@dataclass
class Check:
    args: argparse.Namespace
    device: torch.device
    path: Path  # the saved model
    num_layers: int
    depths: list[int]  # static exit depths: 1/4, 1/2 and 3/4 of the layers
    prompts: list[list[int]]
    levels: list[tuple[int, int]]  # (requests at a time, prompts)

    def config(self, **kw: object) -> EngineConfig:
        a, c = self.args, self.args.concurrency
        return EngineConfig(
            model=str(kw.pop("model", self.path)), exit_pack="none", device=self.device.type, exit_points=self.depths,
            min_exit_depth=self.depths[0], max_num_seqs=max(c, 2), max_model_len=a.prompt_len + a.max_tokens,
            max_num_batched_tokens=max(512, c * a.prompt_len), **kw,
        )  # fmt: skip

    def engine(
        self, engine: Engine, level: tuple[int, int], exits: list[dict | None], speculative: dict | None = None
    ) -> Callable[[], Awaitable[Run]]:
        concurrency, n = level
        return lambda: engine_tps(engine, self.prompts[:n], exits, self.args.max_tokens, concurrency, speculative)

    def hf(self, model: LlamaForCausalLM, level: tuple[int, int]) -> Callable[[], Awaitable[Run]]:
        concurrency, n = level

        async def measure() -> Run:
            sync(self.device)
            return Run(hf_speed(InputsToDevice(model), self.prompts[:n], self.args.max_tokens, concurrency))

        return measure

    async def full_depth(self, model: LlamaForCausalLM, engine: Engine) -> dict:
        report: dict = {}
        runs: dict[int, Run] = {}
        for level in self.levels:
            measures = {"hf": self.hf(model, level), "engine": self.engine(engine, level, [FULL] * level[1])}
            report[str(level[0])], last = await interleaved(measures, "hf", self.args.rounds)
            runs[level[0]] = last["engine"]
        hf_tokens = [hf_greedy(model, p, self.args.max_tokens) for p in self.prompts[: self.args.parity_prompts]]
        report["parity"] = {
            "tokens_per_prompt": self.args.max_tokens,
            "alone": parity(runs[1].tokens, hf_tokens),
            "batched": parity(runs[self.args.concurrency].tokens, hf_tokens),
        }
        return report

    async def static_exits(self, engine: Engine) -> dict:
        variants = {f"static {d}": [d] for d in self.depths} | {f"mix {'/'.join(map(str, self.depths))}": self.depths}
        report: dict[str, dict] = {name: {"depths": ds} for name, ds in variants.items()}
        for level in self.levels:
            concurrency, n = level
            per_request = {name: [ds[i % len(ds)] for i in range(n)] for name, ds in variants.items()}
            measures = {"full": self.engine(engine, level, [FULL] * n)} | {
                name: self.engine(engine, level, [static(d) for d in ds]) for name, ds in per_request.items()
            }
            table, last = await interleaved(measures, "full", self.args.rounds)
            for name, row in report.items():
                row[str(concurrency)] = {
                    **table[name],
                    "full_tokens_per_s": table["full"]["tokens_per_s"],
                    "mean_exit_depth": round(statistics.fmean(d for ds in last[name].depths for d in ds), 3),
                    **bounds(self.num_layers, per_request[name], concurrency),
                }
                log(f"  {name}, {concurrency} at a time: {row[str(concurrency)]}")
        return report

    async def layer_groups(self) -> dict:
        engines = {
            "async": Engine.local(self.config(num_layer_groups=4, sync_backfill=False)),
            "sync": Engine.local(self.config(num_layer_groups=4, sync_backfill=True)),
        }
        report: dict = {"groups": 4, "exit_depth": self.depths[0]}
        for level in self.levels:
            exits = [static(self.depths[0])] * level[1]
            measures = {name: self.engine(engine, level, exits) for name, engine in engines.items()}
            report[str(level[0])], _ = await interleaved(measures, "sync", self.args.rounds)
            log(f"  {level[0]} at a time: {report[str(level[0])]}")
        for engine in engines.values():
            await engine.shutdown()
        return report

    async def speculative(self, path: Path) -> dict:
        """Section 4, on the copy at `path` whose layers from the draft depth on add nothing."""
        depth = self.depths[-1]
        spec = {"num_tokens": 4, "draft_depth": depth}
        same = dict(num_layer_groups=1, model=str(path), speculative_max_batch=max(self.args.concurrency, 8))
        engines = {
            "full": Engine.local(self.config(**same)),
            "adaptive": Engine.local(self.config(**same)),
            "every round": Engine.local(self.config(**same, speculative_adaptive=False)),
        }
        report: dict = {"draft_depth": depth, "num_tokens": 4}
        for level in self.levels:
            n = level[1]
            measures = {"full": self.engine(engines["full"], level, [FULL] * n)}
            for name in ("adaptive", "every round"):
                measures[name] = self.engine(engines[name], level, [None] * n, spec)
            table, last = await interleaved(measures, "full", self.args.rounds)
            for name in ("adaptive", "every round"):
                run = last[name]
                identical = sum(a == b for a, b in zip(run.tokens, last["full"].tokens, strict=True))
                table[name] |= {"identical": identical, "prompts": n, "drafted": run.drafted, "accepted": run.accepted}
            report[str(level[0])] = table
            log(f"  {level[0]} at a time: {table}")
        for engine in engines.values():
            await engine.shutdown()
        return report


async def run_check(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = resolve_dtype("auto", device)
    shape = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    num_layers, c = shape["num_hidden_layers"], args.concurrency
    depths = sorted({max(1, num_layers * k // 4) for k in (1, 2, 3)})
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, shape["vocab_size"]) for _ in range(args.prompt_len)] for _ in range(c)]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {
        "machine": machine(gpu),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": {**shape, "rope_theta": ROPE["rope_theta"]},
        "settings": {k: getattr(args, k) for k in ("prompt_len", "max_tokens", "concurrency", "alone", "rounds")},
        "exit_depths": depths,
    }
    log(f"building a {num_layers}-layer Llama (hidden {shape['hidden_size']}), random weights, {device}, {dtype}")
    model = build_model(shape, device, dtype, args.seed)
    with workdir(sum(p.numel() * p.element_size() for p in model.parameters())) as tmp:
        check = Check(args, device, Path(tmp), num_layers, depths, prompts, [(1, min(args.alone, c)), (c, c)])
        save_model(model, check.path)
        engine = Engine.local(check.config(num_layer_groups=1))
        weak = Path(tmp) / "weak"
        sync(device)
        report["setup_s"] = round(time.perf_counter() - started, 1)

        log(f"[1/4] full depth vs HF generate ({c} prompts of {args.prompt_len} ids, {args.max_tokens} new tokens)")
        report["full_depth"] = await check.full_depth(model, engine)
        log(f"  {report['full_depth']}")
        zero_late_layers(model, depths[-1])  # section 4's copy
        save_model(model, weak)
        del model
        gc.collect()

        log(f"[2/4] static exits at {depths} and a heterogeneous batch, against full depth")
        report["static_exits"] = await check.static_exits(engine)
        await engine.shutdown()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        log(f"[3/4] 4 layer groups, static exit at {depths[0]}: asynchronous vs synchronous back-fill")
        report["layer_groups"] = await check.layer_groups()
        log(f"[4/4] speculative decoding: identity-head drafts at {depths[-1]}, the later layers adding nothing")
        report["speculative"] = await check.speculative(weak)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model, float32, few tokens (CI, on CPU)")
    p.add_argument("--layers", type=int, help="override the model's layer count (a smaller, faster check)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--alone", type=int, help="prompts run one request at a time")
    p.add_argument("--parity-prompts", type=int)
    p.add_argument("--rounds", type=int, help="interleaved rounds per comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    names = ("prompt_len", "max_tokens", "concurrency", "alone", "parity_prompts", "rounds")
    for name, default in zip(names, SIZES["tiny" if args.tiny else "gpu"], strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = asyncio.run(run_check(args))
    publish(report, args.json)
    return report


if __name__ == "__main__":
    main()
