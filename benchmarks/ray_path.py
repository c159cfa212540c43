"""Where one stream's time per token goes on its way through Ray and Serve, on one machine.

The same greedy stream (default model, three layer groups, full depth or the shipped pack's default
exits) at four levels, in interleaved rounds (1, 2, 3, 4, 1, 2, ...):

1. in-process: the engine with its layer groups on threads of this process;
2. Ray actors: the same engine in this process calling the layer groups as Ray actors (no Serve);
3. Serve handle: the pipeline replica's `generate` stream read through a DeploymentHandle (no HTTP);
4. HTTP: the whole path, an SSE stream through Serve's proxy and the ingress.

For levels 1 and 2 every step is split into the layer groups' own compute (the calls on the critical path,
as each worker times itself) and the rest (submitting the calls, moving hidden states between workers,
fetching results). The differences between levels are the cost of each hop.

First, the floor of Ray's mechanisms for one step's chain of three calls carrying a hidden state (no model):
ordinary actor calls, as the pipeline makes them, against a Ray Compiled Graph of the same chain.

    python benchmarks/ray_path.py --rounds 3 --json out.json
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from engine_speed import PROMPTS, engine_parser, log, machine, publish  # benchmarks/ is on sys.path
from ray import serve
from ray.dag import InputNode, MultiOutputNode
from serve_speed import local_app

from serving.app import build_app
from serving.config import APP_NAME
from serving.deploy import server
from serving.deploy.ray_groups import ray_groups
from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.engine.messages import GenerateRequest, RequestOutput
from serving.engine.params import ExitParams, SamplingParams
from serving.engine.plan import PipelinePlan
from workers.exit_pack import ExitPack

EXITS = {
    "full depth": {"policy": "none"},
    "pack default": {},
    "static 16": {"policy": "static", "max_depth": 16, "backfill": "decoupled"},
}


class StepClock:
    """Wraps an engine's Pipeline.collect: per step, wall time from submission to results, and the compute
    of the group calls on the critical path (their own start/end stamps)."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[tuple[float, float]] = []
        pipeline = engine.pipeline
        submit, collect = pipeline.submit, pipeline.collect
        started: dict[int, float] = {}

        def timed_submit(rows):
            submitted = submit(rows)
            started[id(submitted)] = time.time_ns()
            return submitted

        async def timed_collect(submitted, on_trailing=None):
            result = await collect(submitted, on_trailing)
            wall = time.time_ns() - started.pop(id(submitted))
            self.steps.append((wall / 1e6, sum(end - start for start, end in result.timings) / 1e6))
            return result

        pipeline.submit, pipeline.collect = timed_submit, timed_collect

    def take(self) -> dict:
        steps, self.steps = self.steps, []
        wall = statistics.fmean(w for w, _ in steps)
        compute = statistics.fmean(c for _, c in steps)
        return {"step_ms": round(wall, 2), "compute_ms": round(compute, 2), "overhead_ms": round(wall - compute, 2)}


async def engine_stream(engine: Engine, prompt: str, tokens: int, exit: dict) -> float:
    """ms per token of one greedy stream after its first token."""
    sampling = {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    stamps = []
    async for out in engine.generate(prompt, sampling, exit):
        stamps += [time.perf_counter()] * len(out.token_ids)
    return 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)


async def handle_stream(handle, prompt: str, tokens: int, exit: dict) -> float:
    request = GenerateRequest(
        request_id=f"bench-{time.perf_counter_ns()}",
        prompt=prompt,
        messages=None,
        sampling=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
        exit=ExitParams(**exit),
    )
    stamps = []
    async for event in handle.options(stream=True).generate.remote(request):
        if isinstance(event, RequestOutput):
            stamps += [time.perf_counter()] * len(event.token_ids)
    return 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)


async def http_stream(url: str, model: str, prompt: str, tokens: int, exit: dict) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "adept": exit}  # fmt: skip
    stamps = []
    async with httpx.AsyncClient(timeout=600) as client, client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                stamps += [time.perf_counter()] * len(json.loads(line[6:])["adept"]["token_ids"])
    return 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)


@ray.remote(num_cpus=0.25)
class _Hop:
    """A layer group that does nothing: what a step's chain costs in Ray alone."""

    @ray.method(num_returns=2)
    def forward(self, x: dict) -> tuple[dict, dict]:
        return {"exited": np.zeros(1, np.int64)}, x

    def forward_graph(self, x: dict) -> dict:
        return x


def call_floor(steps: int) -> dict:
    """ms per step of a three-call chain (a 576-float hidden state and a row of metadata): ordinary actor
    calls awaited as the pipeline awaits them, and a compiled graph."""
    hops = [_Hop.remote() for _ in range(3)]
    ray.get([h.__ray_ready__.remote() for h in hops])
    payload = {"hidden": np.zeros((1, 576), np.float32), "rows": np.zeros(16, np.int64)}

    async def plain() -> float:
        started = time.perf_counter()
        for _ in range(steps):
            refs, x = [], payload
            for h in hops:
                result, x = h.forward.remote(x)
                refs.append(result)
            for ref in refs:
                await ref
        return 1000 * (time.perf_counter() - started) / steps

    actor_calls = asyncio.run(plain())
    with InputNode() as given:
        outputs, x = [], given
        for h in hops:
            x = h.forward_graph.bind(x)
            outputs.append(x)
    graph = MultiOutputNode(outputs).experimental_compile()
    try:
        started = time.perf_counter()
        for _ in range(steps):
            ray.get(graph.execute(payload))
        compiled = 1000 * (time.perf_counter() - started) / steps
    finally:
        graph.teardown()
    for h in hops:
        ray.kill(h)
    return {"actor_calls_ms_per_step": round(actor_calls, 2), "compiled_graph_ms_per_step": round(compiled, 2)}


def main(args) -> dict:
    engine_config = EngineConfig(num_layer_groups=3, max_model_len=512, max_num_seqs=8)
    config = local_app(args, engine_config, worker_threads=args.worker_threads)
    report: dict = {
        "machine": machine(),
        "layer_groups": 3,
        "max_tokens": args.max_tokens,
        "worker_threads": args.worker_threads,
    }
    server.init_ray(config, num_cpus=os.cpu_count())
    try:
        report["ray_floor"] = call_floor(args.floor_steps)
        log(f"  a three-call chain: {report['ray_floor']}")
        local = Engine.local(engine_config)

        def make_groups(_path: Path, plan: PipelinePlan, _pack: ExitPack | None):
            resources = config.worker_bundle(False)
            return ray_groups(engine_config, plan, resources, args.worker_threads, lambda i: f"bench-group-{i}", 0)

        actors = Engine.build(engine_config, make_groups)
        clocks = {"in-process": StepClock(local), "Ray actors": StepClock(actors)}
        server.start(config, build_app(config))
        handle = serve.get_deployment_handle("PipelineReplica", APP_NAME)
        url = f"http://127.0.0.1:{args.http_port}/v1/completions"
        levels = {
            "in-process": lambda p, e: engine_stream(local, p, args.max_tokens, e),
            "Ray actors": lambda p, e: engine_stream(actors, p, args.max_tokens, e),
            "Serve handle": lambda p, e: handle_stream(handle, p, args.max_tokens, e),
            "HTTP": lambda p, e: http_stream(url, config.served_name(), p, args.max_tokens, e),
        }
        for name, exit in EXITS.items():
            per_token: dict[str, list[float]] = {level: [] for level in levels}
            steps: dict[str, list[dict]] = {level: [] for level in clocks}
            for level, run in levels.items():  # warm-up
                asyncio.run(run(PROMPTS[0], exit))
                if level in clocks:
                    clocks[level].take()
            for r in range(args.rounds):
                for level, run in levels.items():
                    per_token[level].append(asyncio.run(run(PROMPTS[r % len(PROMPTS)], exit)))
                    if level in clocks:
                        steps[level].append(clocks[level].take())
                log(f"  {name}, round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in per_token.items()))
            base = per_token["in-process"]
            report[name] = {
                level: {
                    "ms_per_token": round(statistics.median(v), 2),
                    "vs_in_process": [round(b / x, 3) for b, x in zip(base, v, strict=True)],
                    **({"steps": steps[level]} if level in steps else {}),
                }
                for level, v in per_token.items()
            }
    finally:
        server.stop()
    return report


if __name__ == "__main__":
    p = engine_parser(__doc__)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker-threads", type=int, default=None, help="torch threads per layer-group worker")
    p.add_argument("--floor-steps", type=int, default=300, help="steps of the three-call chain without a model")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    args = p.parse_args()
    publish(main(args), args.json)
