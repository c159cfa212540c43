"""Early exit judged by lm-evaluation-harness: `adept serve`'s application on a local Ray, started once per
operating point with that point's default exit controls (lm-eval sends no `adept` fields: it gets the
defaults), and lm-eval's `local-completions` model against it on the offline tasks in
benchmarks/lm_eval_tasks (SST-2 accuracy, WikiText-2 perplexity). Writes a table: per point and task, the
task's figure, prompt and decode layer compute saved, and time per request.

    python benchmarks/lm_eval_bench.py --tasks sst2_adept_report wikitext_adept_report --json out.json
    python benchmarks/lm_eval_bench.py --limit 20 --points "full depth" "prefill static 20" --check
    python benchmarks/lm_eval_bench.py --point 'mine={"prefill": {"policy": "learned", "threshold": 0.2}}'

Run it from the repository root (the task files read ../shared/data). The usage each response reports is
summed by a thin subclass of `local-completions` that records it and changes nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import httpx
from engine_speed import log, machine  # benchmarks/ is on sys.path
from ray import serve
from serve_speed import local_app, run_benchmark, server_options

from serving.app import build_app
from serving.config import APP_NAME
from serving.deploy import server
from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.engine.params import ExitParams
from serving.quality.evaluation import continuation_logprobs
from workers.model_store import resolve_model

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
# Operating points: the application's default exit controls (`engine.exit`).
POINTS = {
    "full depth": {"policy": "none"},
    "pack default": {},  # the shipped exit pack's tuned controls
    # the classification operating point (benchmarks/classify_speed.py); echo scores the label at the position
    # before the last, so the last two run at full depth
    "prefill static 20": {
        "policy": "none",
        "prefill": {"policy": "static", "max_depth": 20, "backfill": "decoupled", "full_depth_last": 2},
    },
}
BATCH = 8  # prompts per request
FIGURES = {"acc,none": "accuracy", "word_perplexity,none": "word perplexity", "byte_perplexity,none": "byte perplexity"}
USAGE_KEYS = ("prompt_layers_computed", "prompt_layers_total", "layers_computed", "layers_total")


class _Recorder:
    """Usage summed over the responses lm-eval parses, and how many there were."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.usage = dict.fromkeys(USAGE_KEYS, 0)
        self.requests = 0

    def add(self, outputs: dict | list[dict]) -> None:
        for out in outputs if isinstance(outputs, list) else [outputs]:
            self.requests += 1
            for key in USAGE_KEYS:
                self.usage[key] += out.get("usage", {}).get(key, 0)


RECORDER = _Recorder()


def register_recording_model() -> str:
    """`local-completions`, recording each response's usage."""
    from lm_eval.api.registry import register_model
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    @register_model("adept-local-completions")
    class Recording(LocalCompletionsAPI):
        @staticmethod
        def parse_logprobs(outputs, tokens=None, ctxlens=None, **kwargs):
            RECORDER.add(outputs)
            return LocalCompletionsAPI.parse_logprobs(outputs, tokens, ctxlens, **kwargs)

        @staticmethod
        def parse_generations(outputs, **kwargs):
            RECORDER.add(outputs)
            return LocalCompletionsAPI.parse_generations(outputs, **kwargs)

    return "adept-local-completions"


def saved(u: dict[str, int]) -> dict[str, float | None]:
    """Layer compute saved against full depth, for prompt tokens and for generated ones."""
    decode_computed = u["layers_computed"] - u["prompt_layers_computed"]
    decode_total = u["layers_total"] - u["prompt_layers_total"]
    prompt = 1 - u["prompt_layers_computed"] / u["prompt_layers_total"] if u["prompt_layers_total"] else None
    decode = 1 - decode_computed / decode_total if decode_total else None
    return {
        "prompt compute saved": None if prompt is None else round(prompt, 4),
        "decode compute saved": None if decode is None else round(decode, 4),
    }


def harness_model(name: str, url: str, served: str):
    """lm-eval's model object for the served application (the harness would build the same from its name)."""
    from lm_eval.api.registry import get_model

    return get_model(name)(
        base_url=f"{url}/v1/completions",
        model=served,
        tokenizer=str(resolve_model(EngineConfig().model)),
        tokenizer_backend="huggingface",
        max_length=2048,
        batch_size=BATCH,
    )


def evaluate(lm, tasks: list[str], limit: int | None) -> tuple[dict, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        limit=limit,
        bootstrap_iters=0,
        log_samples=True,
    )
    return out["results"], out["samples"]


def in_process_check(lm, task: str, samples: list[dict]) -> dict:
    """At full depth, what lm-eval received against a direct computation on the same tokens: WikiText's
    rolling log-likelihoods against the in-process engine (lm-eval's own windows), SST-2's predictions
    against Hugging Face transformers."""
    from lm_eval import utils

    if task.startswith("wikitext"):
        pairs, served = [], []
        for doc in samples:
            (page,) = doc["arguments"][0]
            windows = utils.get_rolling_token_windows(lm.tok_encode(page), lm.prefix_token_id, lm.max_length - 1, 1)
            pairs += [tuple(map(list, utils.make_disjoint_window(w))) for w in windows]
            served.append(doc["resps"][0][0])

        async def reference() -> list[float]:
            engine = Engine.local(EngineConfig(num_layer_groups=3, max_model_len=2048))
            try:  # a few windows at a time: teacher forcing reserves each window's K/V whole
                out = []
                for i in range(0, len(pairs), 8):
                    out += await continuation_logprobs(engine, pairs[i : i + 8], {"policy": "none"})
                return out
            finally:
                await engine.shutdown()

        total, ref = sum(served), sum(asyncio.run(reference()))
        return {"served log-likelihood": round(total, 2), "in-process log-likelihood": round(ref, 2),
                "relative difference": abs(total - ref) / abs(ref)}  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(EngineConfig().model), dtype=torch.float32).eval()
    same = 0
    for doc in samples:
        hf = []
        for context, continuation in doc["arguments"]:
            ctx, cont = lm._encode_pair(context, continuation)  # as the harness splits them
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
            hf.append(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
        served = [r[0][0] for r in doc["resps"]]
        same += max(range(len(hf)), key=hf.__getitem__) == max(range(len(served)), key=served.__getitem__)
    return {"predictions equal to Hugging Face's": f"{same}/{len(samples)}"}


def main(args: argparse.Namespace) -> dict:
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    points = {name: POINTS[name] for name in args.points}
    for extra in args.point:
        name, _, controls = extra.partition("=")
        points[name] = json.loads(controls)
    config = local_app(args, EngineConfig(max_model_len=2048))
    url = f"http://127.0.0.1:{args.http_port}"
    lm = harness_model(register_recording_model(), url, config.served_name())
    report: dict = {"machine": machine(), "tasks": args.tasks, "limit": args.limit, "points": {}}
    server.init_ray(config, num_cpus=os.cpu_count())
    try:
        server.start(config, build_app(config))
        for name, exit in points.items():
            engine = config.engine.model_copy(update={"exit": ExitParams.model_validate(exit)})
            point = config.model_copy(update={"engine": engine})
            # A new application per point: Serve keeps the running replicas of a redeployed one when it
            # judges its deployments unchanged, and they would keep the last point's defaults.
            serve.delete(APP_NAME)
            serve.run(build_app(point), name=APP_NAME, route_prefix="/")
            served = httpx.get(f"{url}/v1/models").json()["data"][0]["adept"]["default_exit"]
            log(f"{name}: the server's default exit controls {served}")
            rows = {}
            for task in args.tasks:
                RECORDER.reset()
                started = time.monotonic()
                results, samples = evaluate(lm, [task], args.limit)
                seconds = time.monotonic() - started
                row = {label: round(results[task][key], 4) for key, label in FIGURES.items() if key in results[task]}
                row |= saved(RECORDER.usage) | {
                    "requests": RECORDER.requests,
                    "seconds per request": round(seconds / max(RECORDER.requests, 1), 3),
                }
                if exit == {"policy": "none"} and args.check:
                    row |= in_process_check(lm, task, samples[task])
                rows[task] = row
                log(f"{name} / {task}: {row}")
            report["points"][name] = {"exit": exit, "served_defaults": served, "tasks": rows}
    finally:
        server.stop()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sst2_adept_report", "wikitext_adept_report"])
    p.add_argument("--points", nargs="+", choices=list(POINTS), default=list(POINTS))
    p.add_argument("--point", action="append", default=[], help="NAME=JSON: another operating point")
    p.add_argument("--limit", type=int, help="documents per task (default: all)")
    p.add_argument("--check", action="store_true", help="full depth: check lm-eval's numbers against direct ones")
    server_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    run_benchmark(main, parse_args())
