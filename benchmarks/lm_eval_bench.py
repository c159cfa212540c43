"""Early exit judged by lm-evaluation-harness: `adept serve`'s application on a local Ray, started once per
operating point with that point's default exit controls (lm-eval sends no `adept` fields: it gets the
defaults), and lm-eval's `local-completions` model against it on the offline tasks in
benchmarks/lm_eval_tasks (SST-2 accuracy, WikiText-2 perplexity). Writes a table: per point and task, the
task's figure, prompt and decode layer compute saved, and time per request.

    python benchmarks/lm_eval_bench.py --tasks sst2_adept_report wikitext_adept_report --json out.json
    python benchmarks/lm_eval_bench.py --limit 20 --points "full depth" "prefill static 16"
    python benchmarks/lm_eval_bench.py --point 'mine={"prefill": {"policy": "learned", "threshold": 0.2}}'

Run it from the repository root (the task files read ../shared/data). The usage each response reports is
summed by a thin subclass of `local-completions` that records it and changes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import httpx
from engine_speed import log, machine  # benchmarks/ is on sys.path
from ray import serve
from serve_speed import local_app, run_benchmark, server_options

from serving import server
from serving.app import build_app
from serving.config import APP_NAME, EngineConfig
from serving.params import ExitParams
from workers.model_store import resolve_model

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
# Operating points: the application's default exit controls (`engine.exit`).
POINTS = {
    "full depth": {"policy": "none"},
    "pack default": {},  # the shipped exit pack's tuned controls
    "prefill static 16": {"policy": "none", "prefill": {"policy": "static", "max_depth": 16, "full_depth_last": 2}},
    "prefill learned 0.3": {
        "policy": "none",
        "prefill": {"policy": "learned", "threshold": 0.3, "backfill": "mapped", "full_depth_last": 2},
    },
}
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


def evaluate(model: str, url: str, served: str, tasks: list[str], limit: int | None, batch: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args={
            "base_url": f"{url}/v1/completions",
            "model": served,
            "tokenizer": str(resolve_model(EngineConfig().model)),
            "tokenizer_backend": "huggingface",
            "max_length": 2048,
        },
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        batch_size=batch,
        limit=limit,
        bootstrap_iters=0,
        log_samples=False,
    )
    return out["results"]


def main(args: argparse.Namespace) -> dict:
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    points = {name: POINTS[name] for name in args.points}
    for extra in args.point:
        name, _, controls = extra.partition("=")
        points[name] = json.loads(controls)
    model = register_recording_model()
    config = local_app(args, EngineConfig(max_model_len=2048))
    url = f"http://127.0.0.1:{args.http_port}"
    report: dict = {"machine": machine(), "tasks": args.tasks, "limit": args.limit, "points": {}}
    server.init_ray(config, num_cpus=os.cpu_count())
    try:
        server.start(config)
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
                results = evaluate(model, url, config.served_name(), [task], args.limit, args.batch_size)[task]
                seconds = time.monotonic() - started
                row = {label: round(results[key], 4) for key, label in FIGURES.items() if key in results}
                row |= saved(RECORDER.usage) | {
                    "requests": RECORDER.requests,
                    "seconds per request": round(seconds / max(RECORDER.requests, 1), 3),
                }
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
    p.add_argument("--batch-size", type=int, default=8, help="prompts per request")
    server_options(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    run_benchmark(main, parse_args())
