"""A node holding a layer group lost mid-stream, on a Ray cluster of several nodes on this machine
(`ray.cluster_utils.Cluster`, as Ray's own tests run one: a head and worker nodes, each its own raylet
with its own CPUs). The application places each pipeline's bundles with `placement_strategy: SPREAD`, so
its replica and layer-group workers sit on different nodes; greedy streams run, and a worker node holding
a layer group (not the replica's, not the head) is removed with SIGKILL to all its processes. Ray
reschedules the lost bundle on a node with room and restarts the worker there; the pipeline replica
rebuilds the KV cache of every running sequence and the streams go on. Reported: requests in flight,
completed with the text a run without the fault gives, failed (with their error), the longest pause in
the streams after the loss, what /health answered meanwhile, KV blocks at the end. With --no-spare the
remaining nodes have no room for the lost bundle: streams must end with a retryable error, not hang.

    python benchmarks/node_loss.py --streams 4 --max-tokens 160 --json out.json
    python benchmarks/node_loss.py --no-spare
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import httpx
import ray
from engine_speed import log, machine  # benchmarks/ is on sys.path
from ray import serve
from ray.cluster_utils import Cluster
from serve_speed import local_app, run_benchmark, server_options

from serving.app import build_app
from serving.config import APP_NAME
from serving.deploy import server
from serving.engine.config import EngineConfig
from serving.engine.exceptions import first_line

PROMPTS = ["The history of the city begins", "In the morning the market", "Rivers carry water from",
           "The committee decided that", "A good recipe for bread", "The old lighthouse keeper"]  # fmt: skip
# Nodes are declared dead after 3 missed health checks 0.5 s apart (Ray's default waits about 15 s).
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500}


async def stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int, arrivals: list) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "adept": {"policy": "none"}}  # fmt: skip
    ids, error = [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = f"{event['error']['type']}: {event['error']['message']}"
                continue
            ids += event["adept"]["token_ids"]
            arrivals.append(time.monotonic())
    return {"token_ids": ids, "error": error}


def health_watch(url: str, stop: threading.Event, seen: list, settle_s: float) -> None:
    """/health every 0.5 s: (seconds, status) whenever the answer changes; ends at `stop` once it is 200
    again (or `settle_s` after `stop`)."""
    last, start, stopped = None, time.monotonic(), None
    while stopped is None or (last != 200 and time.monotonic() - stopped < settle_s):
        if stopped is None and stop.is_set():
            stopped = time.monotonic()
        try:
            code = httpx.get(f"{url}/health", timeout=5).status_code
        except httpx.HTTPError as e:
            code = type(e).__name__
        if code != last:
            seen.append((round(time.monotonic() - start, 1), code))
            last = code
        time.sleep(0.5)


async def victim_node(cluster: Cluster, replica) -> tuple:
    """A worker node holding a layer group but neither the head's nor the pipeline replica's."""
    workers = await replica.workers.remote()
    replica_node = await replica.node.remote()
    by_id = {n.node_id: n for n in cluster.worker_nodes}
    for w in workers:
        if w["node"] in by_id and w["node"] != replica_node:
            return by_id[w["node"]], w
    raise RuntimeError(f"no layer group on a worker node of its own: {workers}, replica on {replica_node}")


async def kv_blocks_once_answered(replica, timeout_s: float = 120) -> dict | str:
    """The pipeline's KV blocks once every worker answers again (a restarted one may still be loading);
    what went wrong if no replica answers in time (one that Serve replaced may wait for room forever)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await asyncio.wait_for(replica.kv_blocks.remote(), timeout=max(deadline - time.monotonic(), 1))
        except (ray.exceptions.RayError, TimeoutError) as e:
            if time.monotonic() > deadline:
                return f"no answer within {timeout_s:.0f} s: {first_line(e)}"
            await asyncio.sleep(1)


async def run(url: str, model: str, cluster: Cluster, args: argparse.Namespace) -> dict:
    replica = serve.get_deployment_handle("PipelineReplica", APP_NAME)
    prompts = (PROMPTS * args.streams)[: args.streams]
    settle = 20.0 if args.no_spare else 120.0  # without room the pipeline cannot come back
    async with httpx.AsyncClient(timeout=600) as client:
        reference = await asyncio.gather(*(stream(client, url, model, p, args.max_tokens, []) for p in prompts))
        node, worker = await victim_node(cluster, replica)
        log(f"layer group {worker['layers']} on node {node.node_id[:8]}: removing it {args.kill_after} s in")
        arrivals: list[float] = []
        tasks = [asyncio.create_task(stream(client, url, model, p, args.max_tokens, arrivals)) for p in prompts]
        await asyncio.sleep(args.kill_after)
        in_flight = sum(not t.done() for t in tasks)
        seen: list = []
        stop = threading.Event()
        watcher = threading.Thread(target=health_watch, args=(url, stop, seen, settle), daemon=True)
        watcher.start()
        removed_at = time.monotonic()
        await asyncio.to_thread(cluster.remove_node, node, False)
        outs = await asyncio.gather(*tasks)
        recovered_s = time.monotonic() - removed_at
        stop.set()
        await asyncio.to_thread(watcher.join)
    after = [t for t in arrivals if t > removed_at]
    pause = max((b - a for a, b in zip([removed_at, *after], after, strict=False)), default=None)
    blocks = await kv_blocks_once_answered(replica, settle)
    completed = [o["token_ids"] == r["token_ids"] for o, r in zip(outs, reference, strict=True) if o["error"] is None]
    return {
        "requests": len(prompts),
        "in_flight_at_loss": in_flight,
        "completed_identical": sum(completed),
        "completed_different": len(completed) - sum(completed),
        "failed": [o["error"] for o in outs if o["error"] is not None],
        "longest_pause_after_loss_s": round(pause, 1) if pause is not None else None,
        "all_done_after_loss_s": round(recovered_s, 1),
        "health_during": seen,
        "kv_blocks": blocks,
        "removed": {"node": node.node_id[:8], "layers": worker["layers"]},
    }  # fmt: skip


def main(args: argparse.Namespace) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": FAST_HEALTH})
    for _ in range(args.worker_nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    engine = EngineConfig(num_layer_groups=3, max_model_len=512, max_num_seqs=max(args.streams, 4),
                          worker_restart_timeout_s=args.restart_timeout)  # fmt: skip
    # Each worker asks for a whole node's CPU, so no two share a node and, with --no-spare, the lost one
    # has nowhere to go.
    config = local_app(args, engine, placement_strategy="SPREAD", worker_resources={"CPU": 1.0})
    report: dict = {"machine": machine(), "nodes": 1 + args.worker_nodes, "spare_node": not args.no_spare}
    server.init_ray(config, address=cluster.address)
    try:
        server.start(config, build_app(config), proxy_location="HeadOnly")  # one machine: one port 8000
        url, model = f"http://127.0.0.1:{args.http_port}", config.served_name()
        report |= asyncio.run(run(url, model, cluster, args))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--kill-after", type=float, default=3.0, help="seconds into the streams")
    p.add_argument("--no-spare", action="store_true", help="no node with room for the lost layer group")
    p.add_argument("--restart-timeout", type=float, default=60.0, help="engine.worker_restart_timeout_s")
    server_options(p)
    args = p.parse_args(argv)
    # Three nodes go whole to the workers; the pipeline replica and the ingress (0.1 CPU each) take up to two
    # more. A fourth worker node spare makes room for the lost worker whatever the placement; without one,
    # the four nodes are full.
    args.worker_nodes = 3 if args.no_spare else 5
    return args


if __name__ == "__main__":
    run_benchmark(main, parse_args())
