"""Misbehaving clients against the real server: over a thousand generated malformed or hostile HTTP requests
and malformed gRPC messages (hypothesis), and 200 clients that leave mid-stream. None may cause a 5xx,
restart a worker or leave a KV block allocated, and a normal request still succeeds afterwards."""

from __future__ import annotations

import asyncio
import json
import random

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_serve_http import PROMPTS, wait_for_clean_blocks

# JSON of any shape, and values that are wrong in interesting ways for a field.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
small_max_tokens = st.one_of(st.integers(min_value=-3, max_value=3), st.text(max_size=5), st.floats(), st.booleans())
roles = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]), st.text(max_size=8))
messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": roles}, optional={"content": st.one_of(st.text(max_size=60), json_values), "name": json_values}
        ),
        max_size=4,
    )
    | json_values
)
adept = st.one_of(
    st.none(),
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "policy": st.one_of(st.sampled_from(["none", "static", "confidence", "learned", "LEARNED"]), json_values),
            "threshold": st.one_of(st.floats(), json_values),
            "min_depth": st.one_of(st.integers(-5, 40), json_values),
            "max_depth": st.one_of(st.integers(-5, 40), json_values),
            "backfill": st.one_of(st.sampled_from(["exact", "decoupled", "mapped", "none"]), json_values),
        },
    ),
)


def _bodies(model: str) -> st.SearchStrategy[dict]:
    """Requests near the real schema: every field may be missing, wrong or extreme; max_tokens is always
    small so that the well-formed ones finish quickly."""
    common = {
        "temperature": st.one_of(st.floats(), json_values),
        "top_p": st.one_of(st.floats(), json_values),
        "top_k": st.one_of(st.integers(-(2**40), 2**40), json_values),
        "seed": st.one_of(st.integers(-(2**70), 2**70), json_values),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20), json_values),
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
        "logprobs": st.one_of(st.booleans(), st.integers(-2, 30), json_values),
        "n": st.one_of(st.integers(-1, 3), json_values),
        "adept": adept,
        "ignore_eos": st.one_of(st.booleans(), json_values),
        "unknown_field": json_values,
    }
    model_field = st.one_of(st.just(model), st.text(max_size=12), json_values)
    chat = st.fixed_dictionaries(
        {"model": model_field, "messages": messages, "max_tokens": small_max_tokens}, optional=common
    )
    prompts = st.one_of(
        st.text(max_size=80),
        st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=8),
        st.lists(st.text(max_size=5), max_size=3),
        json_values,
    )
    completion = st.fixed_dictionaries(
        {"model": model_field, "prompt": prompts, "max_tokens": small_max_tokens}, optional=common
    )
    return st.one_of(chat.map(lambda b: ("/v1/chat/completions", b)), completion.map(lambda b: ("/v1/completions", b)))


def _read(response: httpx.Response) -> None:
    """Every answer is a success or a 4xx with an OpenAI error object; never a 5xx."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert "message" in response.json()["error"]


FUZZ = settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
RAW = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
GRPC = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def workers_before(served) -> list[dict]:
    return served.replica().workers.remote().result()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.http, timeout=120) as client:
        yield client


def test_fuzzed_openai_requests(served, workers_before, http):
    sent = []

    @FUZZ
    @given(data=_bodies(served.model))
    def fuzz(data):
        path, body = data
        sent.append(path)
        # allow_nan: Infinity and NaN are not JSON, a server must refuse them as such.
        raw = json.dumps(body, allow_nan=True)
        with http.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as response:
            response.read()
        _read(response)

    fuzz()
    assert len(sent) >= 600


def test_fuzzed_bytes_headers_and_methods(served, workers_before, http):
    @RAW
    @given(
        raw=st.one_of(
            st.binary(max_size=300),
            st.text(max_size=200).map(str.encode),
            json_values.map(lambda v: json.dumps(v).encode()),
            st.just(b'{"model": "smollm2-135m", "prompt": "hi", "max_tokens": 2'),  # cut short
            st.just(b"\xff\xfe{}"),
        ),
        path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/nothing", "/health"]),
        method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH"]),
        content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
    )
    def fuzz(raw, path, method, content_type):
        headers = {"content-type": content_type} if content_type else {}
        sent.append(path)
        _read(http.request(method, path, content=raw, headers=headers))

    sent = []
    fuzz()
    assert len(sent) >= 200


def test_fuzzed_grpc_messages(served, workers_before):
    """Bytes that are not a valid GenerateRequest, or valid protobuf with hostile values, sent raw."""
    from protos.adept.v1 import adept_pb2 as pb

    hostile = st.builds(
        pb.GenerateRequest,
        model=st.text(max_size=10),
        prompt=st.text(max_size=60),
        max_tokens=st.integers(-(2**31), 3),
        temperature=st.floats(width=32),
        top_p=st.floats(width=32),
        top_k=st.integers(-(2**31), 2**31 - 1),
        seed=st.integers(-(2**63), 2**63 - 1),
        stop=st.lists(st.text(max_size=4), max_size=20),
        logprobs=st.integers(-(2**31), 2**31 - 1),
        adept=st.builds(
            pb.ExitControls,
            policy=st.text(max_size=10),
            threshold=st.floats(width=32),
            min_depth=st.integers(-(2**31), 2**31 - 1),
            max_depth=st.integers(-(2**31), 2**31 - 1),
            backfill=st.text(max_size=10),
        ),
    ).map(lambda m: m.SerializeToString())

    with grpc.insecure_channel(served.grpc) as channel:
        call = channel.unary_stream(
            "/adept.v1.AdeptService/Generate", request_serializer=None, response_deserializer=None
        )

        @GRPC
        @given(raw=st.one_of(st.binary(max_size=200), hostile))
        def fuzz(raw):
            sent.append(raw)
            try:
                for _ in call(raw, timeout=60):
                    pass
            except grpc.RpcError as e:
                assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (e.code(), e.details())

        sent = []
        fuzz()
        assert len(sent) >= 200


def test_no_worker_restarted_and_the_server_still_serves(served, workers_before, http):
    """Runs after the fuzzing above (file order): same worker processes, no KV block left, a normal answer."""
    wait_for_clean_blocks(served)
    assert [w["pid"] for w in served.replica().workers.remote().result()] == [w["pid"] for w in workers_before]
    body = {"model": served.model, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_two_hundred_clients_that_leave_mid_stream_leave_no_kv_block(served):
    """200 streams at once (up to 128 run, the rest wait); each client leaves after reading 0 to 3 events."""
    body = {"model": served.model, "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}
    rng = random.Random(7)

    async def leave_early(client: httpx.AsyncClient, i: int) -> int:
        request = {**body, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
        events = rng.randint(0, 3)
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            if events == 0:
                return response.status_code
            async for line in response.aiter_lines():
                events -= line.startswith("data: ")
                if events == 0:
                    break
        return response.status_code

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(base_url=served.http, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(leave_early(client, i) for i in range(200)))

    assert asyncio.run(run()) == [200] * 200
    wait_for_clean_blocks(served, timeout=60)
    r = httpx.post(f"{served.http}/v1/completions", json={**body, "prompt": PROMPTS[0], "stream": False}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64
