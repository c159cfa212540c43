"""A layer-group worker killed (SIGKILL, as when its process or node is lost) in the middle of streams: Ray
restarts it, the pipeline replica rebuilds the KV cache of every running sequence, and each stream goes on where it
stopped with the text a run without the failure gives. When restarts are used up, streams end with a
retryable error (never a hang), no KV block stays allocated, and Serve replaces the pipeline."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time

import grpc
import httpx
import pytest
from ray import serve

from protos.adept.v1 import adept_pb2 as pb
from protos.adept.v1 import adept_pb2_grpc
from serving.app import build_app
from serving.config import AppConfig
from serving.engine.config import EngineConfig
from tests.test_serve_http import PROMPTS

ENGINE = dict(max_num_seqs=4, max_model_len=512, worker_restart_timeout_s=60, speculative_max_batch=4)
TOKENS = 40


def _deploy(name: str, restarts: int) -> tuple[str, serve.handle.DeploymentHandle]:
    config = AppConfig(engine=EngineConfig(**ENGINE), worker_max_restarts=restarts)
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return name, serve.get_deployment_handle("PipelineReplica", name)


@pytest.fixture
def recovering(served):
    name, replica = _deploy("recovering", restarts=3)
    yield f"{served.http}/{name}", replica
    serve.delete(name)


def _body(model: str, prompt: str, stream: bool, speculative: dict | None = None) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    return body | ({"adept": {"speculative": speculative}} if speculative else {})


async def _stream(client: httpx.AsyncClient, url: str, body: dict, progress: list[float]) -> tuple[str, list[str]]:
    """The streamed text, and every event's kind: token, error or done. Appends a timestamp per token."""
    text, kinds = "", []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                kinds.append("done")
                continue
            event = json.loads(line[6:])
            if "error" in event:
                kinds.append(f"error: {event['error']['type']}: {event['error']['message']}")
                continue
            text += event["choices"][0]["text"]
            kinds += ["token"] * len(event["adept"]["token_ids"])
            progress.append(time.monotonic())
    return text, kinds


def _wait_clean(replica, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        blocks = replica.kv_blocks.remote().result()
        if blocks["free"] == blocks["capacity"] and all(not w for w in blocks["workers"] or []):
            return blocks
        assert time.monotonic() < deadline, f"KV blocks still allocated: {blocks}"
        time.sleep(0.5)


def test_a_killed_worker_loses_no_stream(recovering, served):
    url, replica = recovering
    prompts = PROMPTS[:4]
    reference = [
        httpx.post(f"{url}/v1/completions", json=_body(served.model, p, False), timeout=120).json()["choices"][0][
            "text"
        ]
        for p in prompts
    ]
    before = replica.workers.remote().result()
    victim = before[1]  # the middle layer group
    # half the streams decode speculatively (drafts to depth 20, verified by the last group): mid-round too,
    # the text is full depth's
    speculative = [None, {"num_tokens": 3, "draft_depth": 20}] * 2

    async def run() -> tuple[list, float]:
        progress: list[float] = []
        async with httpx.AsyncClient(timeout=180) as client:
            bodies = [_body(served.model, p, True, s) for p, s in zip(prompts, speculative, strict=True)]
            streams = [asyncio.create_task(_stream(client, url, b, progress)) for b in bodies]
            while len(progress) < 4 * 8:  # every stream well under way
                await asyncio.sleep(0.05)
            killed_at = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            results = await asyncio.gather(*streams)
        gap = max((b - a for a, b in itertools.pairwise(progress) if b > killed_at), default=0.0)
        return results, gap

    results, gap = asyncio.run(run())
    for (text, kinds), expected in zip(results, reference, strict=True):
        assert kinds == ["token"] * TOKENS + ["done"], kinds[-3:]
        assert text == expected  # greedy: the same text as without the failure
    after = replica.workers.remote().result()
    assert after[1]["pid"] != victim["pid"]  # restarted by Ray
    assert [w["pid"] for w in (after[0], after[2])] == [w["pid"] for w in (before[0], before[2])]
    _wait_clean(replica)
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200
    print(f"\nlongest pause in the streams after the kill: {gap:.2f} s")


def test_when_restarts_are_used_up_streams_end_with_a_retryable_error(served):
    name, replica = _deploy("fragile", restarts=0)
    url = f"{served.http}/{name}"
    try:
        pid = replica.workers.remote().result()[2]["pid"]

        async def run() -> tuple[tuple[str, list[str]], grpc.StatusCode | None, str]:
            progress: list[float] = []
            async with httpx.AsyncClient(timeout=120) as client, grpc.aio.insecure_channel(served.grpc) as channel:
                http_stream = asyncio.create_task(_stream(client, url, _body(served.model, PROMPTS[0], True), progress))
                stub = adept_pb2_grpc.AdeptServiceStub(channel)
                request = pb.GenerateRequest(prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0, ignore_eos=True)
                call = stub.Generate(request, metadata=(("application", name),))

                async def grpc_stream() -> tuple[grpc.StatusCode | None, str]:
                    try:
                        async for _ in call:
                            pass
                    except grpc.aio.AioRpcError as e:
                        return e.code(), e.details()
                    return None, ""

                grpc_task = asyncio.create_task(grpc_stream())
                while len(progress) < 5:
                    await asyncio.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
                http_result, (code, details) = await asyncio.wait_for(asyncio.gather(http_stream, grpc_task), 90)
                return http_result, code, details

        (_, kinds), code, details = asyncio.run(run())
        assert kinds[-2].startswith("error: service_unavailable_error") and "retry" in kinds[-2], kinds[-2:]
        assert kinds[-1] == "done" and len(kinds) - 2 < TOKENS
        assert code == grpc.StatusCode.UNAVAILABLE and "retry" in details, (code, details)
        blocks = replica.kv_blocks.remote().result()
        assert blocks["free"] == blocks["capacity"]  # nothing held by the broken pipeline
        # Serve's health check fails for the broken pipeline replica, and Serve replaces it with a new pipeline
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/health", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "the pipeline was not replaced"
            time.sleep(1)
        r = httpx.post(f"{url}/v1/completions", json={**_body(served.model, "Hi", False), "max_tokens": 2}, timeout=120)
        assert r.status_code == 200
    finally:
        serve.delete(name)
