"""Traces: one per request, continuing an incoming W3C traceparent (HTTP header or gRPC metadata), from
Serve's proxy through the ingress and the pipeline replica (other processes) to a span per layer-group call."""

from __future__ import annotations

import secrets
import time

import grpc
import httpx

from protos.adept.v1 import adept_pb2 as pb
from protos.adept.v1 import adept_pb2_grpc
from tests.otlp import Span

GROUPS = {"0-10", "10-20", "20-30"}


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent}-01", trace_id, parent


def _wait_for(collector, trace_id: str, backfills: bool) -> list[Span]:
    deadline = time.monotonic() + 30
    while True:
        spans = collector.trace(trace_id)
        names = [s.name for s in spans]
        request_done = "adept.request" in names and "adept.layer_group.forward" in names
        if request_done and (not backfills or "adept.layer_group.backfill" in names):
            time.sleep(1)  # the last exports of other processes
            return collector.trace(trace_id)
        assert time.monotonic() < deadline, f"trace {trace_id} incomplete: {names}"
        time.sleep(0.2)


def _check_chain(spans: list[Span], incoming_parent: str, depth: int) -> Span:
    """Every span's parent is in the trace, except the root's, which is the caller's span; the engine's
    request span descends from the ingress's and the pipeline replica's spans; returns the request span."""
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.parent_id not in by_id]
    assert {s.parent_id for s in roots} == {incoming_parent}, [(s.name, s.parent_id) for s in roots]
    (request,) = [s for s in spans if s.name == "adept.request"]
    ancestors, node = [], request
    while node.parent_id in by_id:
        node = by_id[node.parent_id]
        ancestors.append(node.name)
    joined = " > ".join(ancestors)
    # router replica < the ingress's call to it (< the ingress's FastAPI span < Serve's proxy, over HTTP)
    assert joined.startswith(
        "replica_handle_request PipelineReplica generate > route_to_replica PipelineReplica generate"
    ), joined
    assert len(ancestors) >= depth, joined
    return request


def test_http_request_trace_continues_traceparent(served, otlp_collector):
    traceparent, trace_id, parent = _traceparent()
    body = {
        "model": served.model,
        "prompt": "The capital of France is",
        "max_tokens": 6,
        "temperature": 0,
        "adept": {"policy": "static", "max_depth": 12, "backfill": "decoupled"},
    }
    r = httpx.post(f"{served.http}/v1/completions", json=body, headers={"traceparent": traceparent}, timeout=120)
    assert r.status_code == 200
    spans = _wait_for(otlp_collector, trace_id, backfills=True)
    request = _check_chain(spans, parent, depth=4)
    assert request.attributes["adept.completion_tokens"] == 6
    assert request.attributes["adept.mean_exit_depth"] == 12.0
    assert request.attributes["adept.layers_computed"] == r.json()["usage"]["layers_computed"]
    assert "adept.time_to_first_token_s" in request.attributes and request.attributes["adept.model"]
    calls = [s for s in spans if s.name.startswith("adept.layer_group.")]
    assert all(s.parent_id == request.span_id for s in calls)
    # exits at depth 12: groups 0-10 and 10-20 compute every token; 20-30 only back-fills, off the critical path
    forward = {s.attributes["adept.layers"] for s in calls if s.name.endswith("forward")}
    assert forward == {"0-10", "10-20"}
    backfill = [s for s in calls if s.name.endswith("backfill")]
    assert {s.attributes["adept.layers"] for s in backfill} == {"20-30"}
    assert all(s.attributes["adept.off_critical_path"] for s in backfill)


def test_grpc_request_trace_continues_traceparent(served, otlp_collector):
    traceparent, trace_id, parent = _traceparent()
    request = pb.GenerateRequest(prompt="Hello", max_tokens=4, temperature=0, adept=pb.ExitControls(policy="none"))
    with grpc.insecure_channel(served.grpc) as channel:
        stub = adept_pb2_grpc.AdeptServiceStub(channel)
        *tokens, final = stub.Generate(request, metadata=(("traceparent", traceparent),), timeout=120)
    assert final.usage.completion_tokens == len(tokens) == 4
    spans = _wait_for(otlp_collector, trace_id, backfills=False)
    # Serve 2.60's gRPC proxy spans do not join the caller's trace; the ingress continues it (serving.telemetry.tracing)
    request_span = _check_chain(spans, parent, depth=2)
    forward = {s.attributes["adept.layers"] for s in spans if s.name == "adept.layer_group.forward"}
    assert forward == GROUPS  # full depth: every worker computed
    assert request_span.attributes["adept.mean_exit_depth"] == 30.0


def test_untraced_requests_leave_no_spans(served, otlp_collector):
    before = len(otlp_collector.spans)
    body = {"model": served.model, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    assert httpx.post(f"{served.http}/v1/completions", json=body, timeout=120).status_code == 200
    time.sleep(1.5)
    assert not [s for s in otlp_collector.spans[before:] if s.name == "adept.request"]
