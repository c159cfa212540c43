"""OpenTelemetry traces. Ray Serve's own tracing is the backbone: its proxy starts (or continues, from a W3C
`traceparent` in HTTP headers or gRPC metadata) the trace, and its spans follow the request through the
ingress replica into the pipeline replica, across processes. Under the replica's span the engine adds one
span per request and, for each of its steps, one span per layer-group call that computed its rows
(`adept.layer_group.forward`) or back-filled them off the critical path (`adept.layer_group.backfill`),
timed by the worker itself.

Spans leave through OTLP/HTTP when the standard OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT)
variables are set where the replicas run; Serve's TracingConfig points at `otlp_span_processors` and
holds the sampling ratio (parent-based: a sampled incoming traceparent is always traced)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    import torch

    from workers.protocol import GroupSpec

EXPORTER = "serving.telemetry.tracing:otlp_span_processors"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_tracer = trace.get_tracer("adept-serve")


def exporting() -> bool:
    return any(os.environ.get(name) for name in ENDPOINT_VARIABLES)


def otlp_span_processors() -> list:
    """Serve's exporter hook (TracingConfig.exporter_import_path): OTLP/HTTP, configured by OTEL_* variables."""
    if not exporting():
        return []
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter())]


def start_request(model: str, prompt_tokens: int, policy: str) -> Span | None:
    """The request's span under the current one (the pipeline replica's), or None when this request is not traced:
    then the engine records nothing more for it."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # tracing off: no provider
        return None
    span = _tracer.start_span(
        "adept.request",
        attributes={"adept.model": model, "adept.prompt_tokens": prompt_tokens, "adept.exit_policy": policy},
    )
    return span if span.is_recording() else None


@contextlib.contextmanager
def continuing(traceparent: str | None, tracestate: str | None) -> Iterator[None]:
    """Make a caller's W3C trace context current, unless the current span already belongs to its trace.
    Ray Serve 2.60's gRPC proxy reads `traceparent` metadata but its spans do not join that trace; the
    ingress continues it here, so that the pipeline replica's and the workers' spans do."""
    if not traceparent or isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield
        return
    carrier = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
    incoming = TraceContextTextMapPropagator().extract(carrier)
    current = trace.get_current_span().get_span_context()
    if current.is_valid and current.trace_id == trace.get_current_span(incoming).get_span_context().trace_id:
        yield
        return
    token = otel_context.attach(incoming)
    try:
        yield
    finally:
        otel_context.detach(token)


@dataclass
class GroupCall:
    """One layer-group call as a request saw it."""

    layers: tuple[int, int]
    timing: tuple[int, int]  # ns, the worker's clock
    rows: int  # the request's rows in the call
    backfill: bool
    off_critical_path: bool


def record_call(parent: Span, call: GroupCall) -> None:
    name = "adept.layer_group.backfill" if call.backfill else "adept.layer_group.forward"
    context = trace.set_span_in_context(parent)
    span = _tracer.start_span(
        name,
        context=context,
        start_time=call.timing[0],
        attributes={
            "adept.layers": f"{call.layers[0]}-{call.layers[1]}",
            "adept.rows": call.rows,
            "adept.off_critical_path": call.off_critical_path,
        },
    )
    span.end(end_time=call.timing[1])


def end_request(span: Span, attributes: dict) -> None:
    span.set_attributes(attributes)
    span.end()


@dataclass
class StepTrace:
    """A step with traced requests: each gets a span per layer-group call that computed or back-filled its
    rows (which rows a group touched follows from their exit layers and the group's layers)."""

    groups: list[GroupSpec]
    spans: list[tuple[Span, int, int]]  # (request span, its rows in the batch)
    sync: bool
    exit_layers: torch.Tensor | None = None

    def computed(self, exit_layers: torch.Tensor, timings: list[tuple[int, int]], first: int = 0) -> None:
        """The step's exits, and the calls on its critical path from group `first` on."""
        self.exit_layers = exit_layers
        for g, timing in enumerate(timings, start=first):
            self._record(g, timing, backfill_only=False)

    def trailing_call(self, group: int, timing: tuple[int, int]) -> None:
        """A call that only back-filled, after the step was done."""
        if self.exit_layers is not None:
            self._record(group, timing, backfill_only=True)

    def _record(self, g: int, timing: tuple[int, int], backfill_only: bool) -> None:
        spec = self.groups[g]
        for span, start, end in self.spans:
            layers = self.exit_layers[start:end]
            entered = int((layers > spec.start).sum())
            if entered:
                record_call(span, GroupCall((spec.start, spec.end), timing, entered, False, False))
            if len(layers) - entered:
                off = backfill_only and not self.sync
                record_call(span, GroupCall((spec.start, spec.end), timing, len(layers) - entered, True, off))
