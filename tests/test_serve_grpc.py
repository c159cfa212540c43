"""The gRPC API through Ray Serve's gRPC proxy, with generated stubs: streaming Generate, ListModels,
server reflection, the same tokens as HTTP and the in-process engine, and bad requests."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.adept.v1 import adept_pb2 as pb
from protos.adept.v1 import adept_pb2_grpc
from serving.engine import Engine
from tests.test_serve_http import PROMPTS, wait_for_clean_blocks


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served.grpc) as channel:
        yield adept_pb2_grpc.AdeptServiceStub(channel)


def generate(stub, **fields) -> tuple[list[pb.GenerateResponse], pb.GenerateResponse]:
    """(token messages, final message)."""
    messages = list(stub.Generate(pb.GenerateRequest(**fields), timeout=120))
    assert messages[-1].finish_reason and messages[-1].usage.completion_tokens == len(messages) - 1
    return messages[:-1], messages[-1]


def test_generate_streams_tokens_with_exit_layers_then_usage(stub, served):
    full = pb.ExitControls(policy="none")
    tokens, final = generate(stub, prompt=PROMPTS[0], max_tokens=8, temperature=0, adept=full)
    assert "Paris" in "".join(t.text for t in tokens)
    assert len(tokens) == 8 and all(t.exit_layer == 30 for t in tokens)
    assert final.finish_reason == "length"
    assert final.usage.layers_computed == final.usage.layers_total == (5 + 7) * 30

    early, _ = generate(
        stub, prompt=PROMPTS[0], max_tokens=5, temperature=0, adept=pb.ExitControls(policy="static", max_depth=16)
    )
    assert [t.exit_layer for t in early] == [16] * 5


def test_chat_messages(stub, served):
    tokens, _ = generate(
        stub, messages=[pb.ChatMessage(role="user", content="What is the capital of France?")], max_tokens=12,
        temperature=0,
    )  # fmt: skip
    assert "Paris" in "".join(t.text for t in tokens)


def test_http_grpc_and_in_process_engine_give_the_same_tokens(stub, served):
    exit = {"policy": "confidence", "threshold": 0.4, "backfill": "decoupled"}
    prompts = PROMPTS[:3]
    by_grpc = []
    for p in prompts:
        tokens, _ = generate(stub, prompt=p, max_tokens=16, temperature=0, adept=pb.ExitControls(**exit))
        by_grpc.append(([t.token_id for t in tokens], [t.exit_layer for t in tokens]))
    by_http = []
    for p in prompts:
        body = {"model": served.model, "prompt": p, "max_tokens": 16, "temperature": 0, "adept": exit}
        adept = httpx.post(served.http + "/v1/completions", json=body, timeout=120).json()["adept"]
        by_http.append((adept["token_ids"], adept["exit_layers"]))

    async def in_process():
        engine = Engine.local(served.config.engine)
        out = []
        for p in prompts:
            ids, exits = [], []
            async for o in engine.generate(p, {"max_tokens": 16, "temperature": 0}, exit):
                ids += o.token_ids
                exits += o.exit_layers
            out.append((ids, exits))
        await engine.shutdown()
        return out

    assert by_grpc == by_http == asyncio.run(in_process())
    assert any(d < 30 for _, exits in by_grpc for d in exits), "the comparison should include early exits"


def test_speculative_decoding_gives_full_depths_tokens(stub, served):
    """Speculative (draft depth unset: auto, by the pack's agreement): full depth's tokens, each marked
    accepted or not, the drafts counted in usage."""
    full, _ = generate(stub, prompt=PROMPTS[1], max_tokens=12, temperature=0, adept=pb.ExitControls(policy="none"))
    spec, final = generate(
        stub, prompt=PROMPTS[1], max_tokens=12, temperature=0, speculative=pb.SpeculativeControls(num_tokens=3)
    )
    assert [t.token_id for t in spec] == [t.token_id for t in full]
    assert "".join(t.text for t in spec) == "".join(t.text for t in full)
    assert all(t.exit_layer == 30 and t.HasField("accepted") for t in spec)
    assert not any(t.HasField("accepted") for t in full)
    usage = final.usage
    assert sum(t.accepted for t in spec) == usage.accepted_tokens <= usage.draft_tokens and usage.draft_tokens > 0


def test_list_models(stub, served):
    (model,) = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    assert model.id == served.model and model.num_layers == 30 and model.num_layer_groups == 3
    assert list(model.exit_points) == [8, 12, 16, 20, 24, 28, 30] and model.max_model_len == 1024
    assert list(model.draft_depths) == [8, 12, 16, 20, 24, 28]  # the exit heads below the last layer
    assert model.auto_draft_depth in model.draft_depths
    assert model.default_speculative.num_tokens == 0 and not model.default_speculative.HasField("draft_depth")


def test_server_reflection_describes_the_service(served):
    with grpc.insecure_channel(served.grpc) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (listing,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for s in listing.list_services_response.service}
        assert "adept.v1.AdeptService" in services
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="adept.v1.AdeptService")
        (described,) = reflection.ServerReflectionInfo(iter([request]))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert methods == {"Generate", "ListModels"}


@pytest.mark.parametrize(
    ("fields", "code", "named"),
    [
        ({"prompt": "hi", "top_p": 3.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt": "hi", "max_tokens": -1}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            {"prompt": "hi", "adept": pb.ExitControls(policy="sometimes")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "adept.policy",
        ),
        ({"prompt": "hi", "adept": pb.ExitControls(max_depth=99)}, grpc.StatusCode.INVALID_ARGUMENT, "adept.max_depth"),
        (
            {"prompt": "hi", "temperature": 0, "speculative": pb.SpeculativeControls(num_tokens=2, draft_depth=30)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "adept.speculative.draft_depth",
        ),
        (
            {"prompt": "hi", "speculative": pb.SpeculativeControls(num_tokens=-1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "adept.speculative.num_tokens",
        ),
        (
            {"prompt": "hi", "speculative": pb.SpeculativeControls(num_tokens=2, min_confidence=-0.5)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "adept.speculative.min_confidence",
        ),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            {"prompt": "hi", "messages": [pb.ChatMessage(role="user", content="hi")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt",
        ),
        ({"messages": [pb.ChatMessage(role="robot", content="hi")]}, grpc.StatusCode.INVALID_ARGUMENT, "role"),
        ({"prompt": "word " * 1100}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"prompt": "hi", "model": "gpt-4"}, grpc.StatusCode.NOT_FOUND, "model"),
    ],
)
def test_bad_requests_are_refused_by_field(stub, served, fields, code, named):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))
    assert info.value.code() == code
    assert named in info.value.details() and "Traceback" not in info.value.details()
    tokens, _ = generate(stub, prompt="Hello", max_tokens=2, temperature=0)
    assert len(tokens) == 2


def test_a_cancelled_stream_leaves_no_kv_block_allocated(stub, served):
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPTS[4], max_tokens=500, temperature=0), timeout=120)
    got = [next(call), next(call)]
    call.cancel()
    assert all(m.token_id for m in got)
    wait_for_clean_blocks(served)
