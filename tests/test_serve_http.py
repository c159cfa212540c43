"""The OpenAI-compatible HTTP API on a real local Ray Serve, driven by the official `openai` client and by
httpx: streaming and not, both endpoints, concurrency, disconnects and bad requests."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray

from serving.engine.speculative import RoundCost, auto_depth
from tests.test_hf_parity import PROMPTS as HF_PROMPTS
from workers.arch import ModelArch
from workers.exit_pack import load_pack
from workers.model_store import DEFAULT_MODEL, load_config, resolve_model

PROMPTS = [
    *HF_PROMPTS,
    "To make a cup of tea, first",
    "In machine learning, overfitting means",
    "The largest planet in the solar system is",
]


def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.http + "/v1", api_key="unused", max_retries=0, timeout=120)


def exits_of(chunks) -> list[int]:
    return [d for c in chunks if c.choices for d in c.model_extra["adept"]["exit_layers"]]


def wait_for_clean_blocks(served, timeout: float = 30.0) -> dict:
    """Poll the pipeline replica until every KV block is free in the scheduler and on every worker."""
    deadline = time.monotonic() + timeout
    while True:
        blocks = served.replica().kv_blocks.remote().result()
        if blocks["free"] == blocks["capacity"] and all(not w for w in blocks["workers"]):
            return blocks
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still allocated: {blocks}")
        time.sleep(0.2)


def test_completions_with_and_without_streaming(served):
    c = client(served)
    deep = {"adept": {"policy": "none"}}
    full = c.completions.create(model=served.model, prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body=deep)
    assert "Paris" in full.choices[0].text and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8 and full.usage.prompt_tokens == 5
    assert full.usage.model_extra["layers_computed"] == full.usage.model_extra["layers_total"] == (5 + 8 - 1) * 30
    assert full.model_extra["adept"]["exit_layers"] == [30] * 8

    chunks = list(
        c.completions.create(
            model=served.model, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=deep,
        )
    )  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert exits_of(chunks) == [30] * 8
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_chat_completions_with_and_without_streaming(served):
    c = client(served)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = c.chat.completions.create(model=served.model, messages=messages, max_tokens=12, temperature=0)
    answer = full.choices[0].message
    assert answer.role == "assistant" and "Paris" in answer.content

    chunks = list(
        c.chat.completions.create(model=served.model, messages=messages, max_tokens=12, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == answer.content
    assert len(exits_of(chunks)) == full.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_exit_layers_follow_the_requests_controls(served):
    c = client(served)
    static = c.completions.create(
        model=served.model, prompt=PROMPTS[2], max_tokens=6, temperature=0,
        extra_body={"adept": {"policy": "static", "max_depth": 12, "backfill": "decoupled"}},
    )  # fmt: skip
    assert static.model_extra["adept"]["exit_layers"] == [12] * 6
    usage = static.usage.model_extra
    assert usage["layers_computed"] == 12 * (static.usage.prompt_tokens + 5) < usage["layers_total"]

    chunks = list(
        c.completions.create(
            model=served.model, prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True,
            extra_body={"adept": {"policy": "confidence", "threshold": 0.3}},
        )
    )  # fmt: skip
    exits = exits_of(chunks)
    assert len(exits) == 16 and all(d in (8, 12, 16, 20, 24, 28, 30) for d in exits)
    assert min(exits) < 30, "a low threshold should let some tokens exit early"

    # unset controls take the shipped exit pack's defaults; policy learned at a low threshold exits earlier
    def depths(adept: dict) -> list[int]:
        out = c.completions.create(
            model=served.model, prompt=PROMPTS[1], max_tokens=16, temperature=0, extra_body={"adept": adept}
        )
        return out.model_extra["adept"]["exit_layers"]

    default, eager = depths({}), depths({"policy": "learned", "threshold": 0.05})
    assert len(default) == 16 and set(default) <= {8, 12, 16, 20, 24, 28, 30}
    assert sum(eager) < sum(default)


SPECULATIVE = {"num_tokens": 3, "draft_depth": 20}  # the default model's boundaries: 10 and 20


def test_speculative_decoding_gives_full_depths_tokens(served):
    """Drafts from depth 20, verified by the last group: the same text and tokens as full depth, with
    per-token `accepted` flags and the drafts counted in usage (whole responses and stream chunks)."""
    c = client(served)
    request = dict(
        model=served.model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16,
        temperature=0,
    )  # fmt: skip
    full = c.chat.completions.create(**request, extra_body={"adept": {"policy": "none"}})
    spec = c.chat.completions.create(**request, extra_body={"adept": {"speculative": SPECULATIVE}})
    assert spec.choices[0].message.content == full.choices[0].message.content
    adept, usage = spec.model_extra["adept"], spec.usage.model_extra
    assert adept["token_ids"] == full.model_extra["adept"]["token_ids"]
    assert adept["exit_layers"] == [30] * spec.usage.completion_tokens
    assert len(adept["accepted"]) == len(adept["token_ids"]) and sum(adept["accepted"]) == usage["accepted_tokens"]
    assert usage["draft_tokens"] > 0 and usage["accepted_tokens"] <= usage["draft_tokens"]
    assert "accepted" not in full.model_extra["adept"]
    assert full.usage.model_extra["draft_tokens"] == full.usage.model_extra["accepted_tokens"] == 0

    chunks = list(
        c.chat.completions.create(
            **request,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"adept": {"speculative": SPECULATIVE}},
        )
    )
    pieces = [ch.model_extra["adept"] for ch in chunks if ch.choices and ch.model_extra["adept"]["token_ids"]]
    assert all(len(p["accepted"]) == len(p["token_ids"]) for p in pieces)
    assert [t for p in pieces for t in p["token_ids"]] == adept["token_ids"]
    assert [a for p in pieces for a in p["accepted"]] == adept["accepted"]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content
    assert chunks[-1].usage.model_extra["accepted_tokens"] == usage["accepted_tokens"]

    # sampled with a seed: reproducible, and what plain decoding gives for that seed
    request.update(temperature=0.9, seed=7)
    sampled = [
        c.chat.completions.create(**request, extra_body={"adept": {"speculative": SPECULATIVE}}) for _ in range(2)
    ]
    plain = c.chat.completions.create(**request, extra_body={"adept": {"policy": "none"}})
    ids = [out.model_extra["adept"]["token_ids"] for out in (*sampled, plain)]
    assert ids[0] == ids[1] == ids[2]
    assert sampled[0].usage.model_extra["draft_tokens"] > 0
    wait_for_clean_blocks(served)


def test_logprobs(served):
    c = client(served)
    out = c.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == 3 and "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token


def test_eight_concurrent_streams_match_their_runs_alone(served):
    c = client(served)
    alone = [
        c.completions.create(model=served.model, prompt=p, max_tokens=12, temperature=0).model_extra["adept"]
        for p in PROMPTS
    ]

    async def stream(ac: openai.AsyncOpenAI, prompt: str) -> dict:
        chunks = [
            ch
            async for ch in await ac.completions.create(
                model=served.model, prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
        ]
        return {
            "token_ids": [t for ch in chunks if ch.choices for t in ch.model_extra["adept"]["token_ids"]],
            "exit_layers": exits_of(chunks),
        }

    async def main():
        async with openai.AsyncOpenAI(base_url=served.http + "/v1", api_key="unused", max_retries=0) as ac:
            return await asyncio.gather(*(stream(ac, p) for p in PROMPTS))

    together = asyncio.run(main())
    assert together == alone
    wait_for_clean_blocks(served)


def test_more_than_eight_streams_run_at_once(served):
    """Memory, not a count of slots, sets concurrency: twelve streams all have their first token before
    any of them ends (with eight slots the other four would wait for one to finish)."""

    async def stream(client: httpx.AsyncClient, prompt: str) -> tuple[float, float]:
        body = {"model": served.model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        first = None
        async with client.stream("POST", served.http + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.monotonic()
        return first, time.monotonic()

    async def main() -> list[tuple[float, float]]:
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*(stream(c, PROMPTS[i % len(PROMPTS)]) for i in range(12)))

    times = asyncio.run(main())
    assert max(first for first, _ in times) < min(end for _, end in times)
    wait_for_clean_blocks(served)


def test_a_client_that_disconnects_leaves_no_kv_block_allocated(served):
    body = {"model": served.model, "prompt": PROMPTS[3], "max_tokens": 500, "temperature": 0, "stream": True}
    got = []
    with httpx.stream("POST", served.http + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            got += [line] if line.startswith("data: {") else []
            if len(got) == 3:
                break  # leave mid-stream: the connection closes here
    assert all(json.loads(line[6:])["choices"][0]["finish_reason"] is None for line in got)
    wait_for_clean_blocks(served)
    after = client(served).completions.create(model=served.model, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert after.usage.completion_tokens == 2


LONG = "word " * 1100  # more tokens than the 1024-token context


@pytest.mark.parametrize(
    ("content", "status", "param"),
    [
        (b"{not json", 400, None),
        ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "hi", "top_p": 3}, 400, "top_p"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "frobnicate": True}, 400, "frobnicate"),
        ({"prompt": "hi", "n": 2}, 400, "n"),
        ({"prompt": "hi", "adept": {"threshold": 2}}, 400, "adept.threshold"),
        ({"prompt": "hi", "adept": {"policy": "warp"}}, 400, "adept.policy"),
        ({"prompt": "hi", "adept": {"policy": "static"}}, 400, "adept.max_depth"),
        ({"prompt": "hi", "adept": {"speculative": {"num_tokens": 99}}}, 400, "adept.speculative.num_tokens"),
        (
            {"prompt": "hi", "adept": {"speculative": {"num_tokens": 2, "draft_depth": 30}}},
            400,
            "adept.speculative.draft_depth",
        ),
        ({"prompt": "hi", "adept": {"speculative": {"draft_depth": "deep"}}}, 400, "adept.speculative.draft_depth"),
        (
            {"prompt": "hi", "adept": {"speculative": {"num_tokens": 2, "min_confidence": "high"}}},
            400,
            "adept.speculative.min_confidence",
        ),
        (
            {"prompt": "hi", "temperature": 0, "adept": {"policy": "none", "speculative": {"num_tokens": 2}}},
            400,
            "adept.policy",
        ),
        ({"prompt": LONG}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "x" * (2 << 20)}, 413, None),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_change_nothing(served, content, status, param):
    if isinstance(content, dict):
        content = json.dumps({"model": served.model, **content}).encode()
    r = httpx.post(
        served.http + "/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if param:
        assert param in error["message"]
    ok = client(served).completions.create(model=served.model, prompt="Hello", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2
    wait_for_clean_blocks(served)


def test_the_openai_client_raises_its_own_errors(served):
    c = client(served)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        c.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}], top_p=5)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=served.model, messages=[])


def auto_draft_depth() -> int:
    """What 'auto' means on this server for up to 16 drafts: the shipped pack's agreement and the CPU cost."""
    model = resolve_model(DEFAULT_MODEL)
    agreement = load_pack("auto", DEFAULT_MODEL, model).agreement
    arch = ModelArch.from_config(load_config(model))
    return auto_depth(16, [8, 12, 16, 20, 24, 28], agreement, lambda d: RoundCost.of(arch, d, "cpu", 16384))


def test_models_and_health(served):
    models = client(served).models.list().data
    assert [m.id for m in models] == [served.model]
    assert models[0].model_extra["adept"] == {
        "num_layers": 30,
        "exit_points": [8, 12, 16, 20, 24, 28, 30],
        "num_layer_groups": 3,
        "default_exit": load_pack("auto", DEFAULT_MODEL, resolve_model(DEFAULT_MODEL)).defaults,  # the shipped pack's
        # the default 1 GiB of K/V in blocks of 16 positions, 46,080 bytes a position (30 layers, float32)
        "kv_cache_tokens": (1 << 30) // (16 * 46_080) * 16,
        "default_speculative": {"num_tokens": 0, "draft_depth": "auto", "min_confidence": 0.0},  # off unless set
        "draft_depths": [8, 12, 16, 20, 24, 28],  # the exit heads below the last layer
        "auto_draft_depth": auto_draft_depth(),
    }
    health = httpx.get(served.http + "/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_one_worker_actor_per_layer_group(served):
    workers = [a for a in ray.util.list_named_actors(all_namespaces=True) if "-group-" in a["name"]]
    assert len(workers) == served.config.engine.num_layer_groups == 3


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (Linux: /proc/net/tcp and tcp6)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little endian
            found.add(socket.inet_ntop(family, raw))
    return found


def test_http_and_grpc_listen_on_loopback_only(served):
    loopback = {"127.0.0.1", "::ffff:127.0.0.1"}
    for port in (served.config.http.port, served.config.grpc.port):
        addresses = listening_addresses(port)
        assert addresses and addresses <= loopback, f"port {port} listens on {addresses}"
