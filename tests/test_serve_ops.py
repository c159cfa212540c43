"""Operating it: API keys, request limits, overload (429 / RESOURCE_EXHAUSTED at once, never a hang), and
health over HTTP and grpc.health.v1. A second application with small limits and a key runs beside the
session's, on the same real Ray, Serve and loopback proxies."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from protos.adept.v1 import adept_pb2 as pb
from protos.adept.v1 import adept_pb2_grpc
from serving.app import build_app
from serving.config import APP_NAME, AppConfig
from serving.engine.config import EngineConfig

KEY = "sk-test-4f1d2c"
GUARDED = "guarded"
LIMITS = dict(max_num_seqs=2, max_waiting_requests=2, max_prompt_tokens=48, max_tokens_limit=40, max_model_len=256)


@pytest.fixture(scope="module")
def guarded(served):
    """An application with an API key, 2 running sequences, 2 waiting places and small prompt/output caps."""
    config = AppConfig(engine=EngineConfig(**LIMITS), api_keys=[KEY], max_request_bytes=4096)
    serve.run(build_app(config), name=GUARDED, route_prefix=f"/{GUARDED}")
    yield f"{served.http}/{GUARDED}", config.served_name()
    serve.delete(GUARDED)


def _auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"authorization": f"Bearer {key}"}


def _chat(model: str, content: str = "Hi", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def test_http_needs_the_right_key(guarded):
    url, model = guarded
    for key in (None, "sk-wrong"):
        r = httpx.post(f"{url}/v1/chat/completions", json=_chat(model, max_tokens=2), headers=_auth(key), timeout=60)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models", headers=_auth(key), timeout=60).status_code == 401
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat(model, max_tokens=2), headers=_auth(KEY), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{url}/v1/models", headers=_auth(KEY), timeout=60).json()["data"][0]["id"] == model
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200  # probes carry no key


def test_grpc_needs_the_right_key(guarded, served):
    request = pb.GenerateRequest(prompt="Hello", max_tokens=2, temperature=0)
    with grpc.insecure_channel(served.grpc) as channel:
        stub = adept_pb2_grpc.AdeptServiceStub(channel)
        for key in (None, "sk-wrong"):
            metadata = (("application", GUARDED), *_auth(key).items())
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request, metadata=metadata, timeout=60))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("application", GUARDED), *_auth(KEY).items())
        *tokens, final = stub.Generate(request, metadata=metadata, timeout=60)
        assert len(tokens) == final.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (lambda m: _chat(m, "word " * 60, max_tokens=2), 400, "max_prompt_tokens 48"),
        (lambda m: _chat(m, max_tokens=41), 400, "max_tokens_limit 40"),
        (lambda m: _chat(m, "x" * 5000, max_tokens=2), 413, "limit is 4096"),
    ],
)
def test_limits_are_refused_by_name(guarded, body, status, says):
    url, model = guarded
    r = httpx.post(f"{url}/v1/chat/completions", json=body(model), headers=_auth(KEY), timeout=60)
    assert r.status_code == status and says in r.json()["error"]["message"], r.text


def test_overload_is_refused_at_once_and_admitted_requests_complete(guarded, served):
    """Ten streams at once against 2 running + 2 waiting places: the rest get 429 with Retry-After within
    seconds (and a gRPC call meanwhile RESOURCE_EXHAUSTED); every admitted stream completes."""
    url, model = guarded
    body = _chat(model, "Count to fifty.", max_tokens=40, ignore_eos=True, stream=True)

    async def one(client: httpx.AsyncClient) -> tuple[int, float, str]:
        started = time.monotonic()
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=_auth(KEY)) as r:
            if r.status_code != 200:
                await r.aread()
                assert r.headers["retry-after"] == "1"
                return r.status_code, time.monotonic() - started, r.json()["error"]["message"]
            text = "".join([line async for line in r.aiter_lines()])
            return 200, time.monotonic() - started, text

    async def run() -> tuple[list, grpc.StatusCode | None]:
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(10)]
            await asyncio.sleep(1.0)  # while the admitted streams hold every place
            code = None
            async with grpc.aio.insecure_channel(served.grpc) as channel:
                stub = adept_pb2_grpc.AdeptServiceStub(channel)
                request = pb.GenerateRequest(prompt="Hello", max_tokens=2)
                try:
                    call = stub.Generate(request, metadata=(("application", GUARDED), *_auth(KEY).items()))
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as e:
                    code = e.code()
            return await asyncio.gather(*tasks), code

    results, grpc_code = asyncio.run(run())
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert len(admitted) <= 4 and len(refused) >= 6
    assert all(status == 429 and "admission queue is full" in message for status, _, message in refused)
    assert max(seconds for _, seconds, _ in refused) < 10
    assert all("[DONE]" in text and '"finish_reason": "length"' in text for _, _, text in admitted)
    assert grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_health_answers_like_http_health(served):
    assert httpx.get(f"{served.http}/health", timeout=60).json() == {"status": "ok"}
    with grpc.insecure_channel(served.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        metadata = (("application", APP_NAME),)
        for service in ("", "adept.v1.AdeptService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), metadata=metadata, timeout=60)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), metadata=metadata, timeout=60)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
