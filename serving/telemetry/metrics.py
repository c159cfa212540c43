"""Prometheus metrics, through Ray's own pipeline: replicas record with `ray.serve.metrics` (which adds the
application, deployment and replica labels), layer-group workers with `ray.util.metrics` (workers/actor.py),
and each node's Ray metrics
agent exports them all, beside Ray's and Serve's own, in Prometheus format on the node's metrics port
(KubeRay: container port `metrics`, 8080). The ingress relays its node's export at /metrics.

The engine reports what happens to an EngineStats: the in-process engine's records nothing, the pipeline replica's
is a RayStats."""

from __future__ import annotations

import asyncio
import urllib.request

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class EngineStats:
    """What the engine reports. This one records nothing."""

    def first_token(self, seconds: float) -> None:
        """Time from admission to a request's first token."""

    def token(self, exit_layer: int) -> None:
        """One generated token and the depth it left at."""

    def finished(self, reason: str, seconds: float, per_token: float | None, computed: int, full: int) -> None:
        """A request ended (stop, length, abort): its latency, time per output token after the first, and the
        layers its tokens ran against what full depth would have run."""

    def scheduler(self, running: int, waiting: int, blocks_used: int, blocks_free: int, preemptions: int) -> None:
        """The scheduler's state after a batch was formed: `preemptions` so far."""

    def backfill(self, seconds: float | None, pending: int) -> None:
        """A back-fill call finished `seconds` after its batch's critical path (None: one was queued);
        `pending` calls remain."""

    def recovered(self, seconds: float) -> None:
        """A lost worker was back after `seconds` and the running sequences' caches are being rebuilt."""

    def speculated(self, depth: int, drafted: int, accepted: int) -> None:
        """A speculative round verified: `drafted` tokens drafted at `depth`, `accepted` of them kept."""


class RayStats(EngineStats):
    """The pipeline replica's: Serve metrics of its replica."""

    def __init__(self, num_layers: int) -> None:
        from ray.serve import metrics

        self.ttft = metrics.Histogram(
            "adept_time_to_first_token_seconds", "admission to first token", boundaries=LATENCY_BUCKETS
        )
        self.tpot = metrics.Histogram(
            "adept_time_per_output_token_seconds", "after the first token", boundaries=LATENCY_BUCKETS
        )
        self.latency = metrics.Histogram(
            "adept_request_latency_seconds", "admission to the last token", boundaries=LATENCY_BUCKETS
        )
        self.tokens = metrics.Counter("adept_generated_tokens", "tokens generated")
        self.exits = metrics.Histogram(
            "adept_exit_layer", "the depth each generated token left at", boundaries=list(range(1, num_layers + 1))
        )
        self.finishes = metrics.Counter("adept_requests_finished", "requests ended, by reason", tag_keys=("reason",))
        self.computed = metrics.Counter("adept_layers_computed", "decoder layers run, prompt and generated tokens")
        self.full = metrics.Counter("adept_layers_full_depth", "decoder layers full depth would have run")
        self.running = metrics.Gauge("adept_running_requests", "sequences in the running batch")
        self.waiting = metrics.Gauge("adept_waiting_requests", "admitted requests waiting to run (the queue)")
        self.blocks_used = metrics.Gauge("adept_pipeline_kv_blocks_used", "KV blocks allocated in this pipeline")
        self.blocks_free = metrics.Gauge("adept_pipeline_kv_blocks_free", "KV blocks free in this pipeline")
        self.preemptions = metrics.Counter("adept_preemptions", "sequences preempted for KV blocks (recomputed later)")
        self._preempted = 0
        self.backfill_pending = metrics.Gauge("adept_backfill_pending", "back-fill calls off the critical path")
        self.recoveries = metrics.Histogram(
            "adept_worker_recovery_seconds", "a lost worker's restart, until its pipeline resumed", LATENCY_BUCKETS
        )
        self.backfill_seconds = metrics.Histogram(
            "adept_backfill_lag_seconds", "a back-fill's finish after its step's critical path", LATENCY_BUCKETS
        )
        # Speculative decoding, as vLLM's spec_decode metrics: per draft depth, acceptance is
        # rate(accepted_tokens) / rate(draft_tokens), and 1 + rate(accepted_tokens) / rate(rounds) the tokens a
        # verification pass yields (drafts a round vary: adaptive drafting picks each round's count).
        depth = ("draft_depth",)
        self.spec_drafted = metrics.Counter("adept_spec_decode_draft_tokens", "tokens drafted", tag_keys=depth)
        self.spec_accepted = metrics.Counter(
            "adept_spec_decode_accepted_tokens", "drafts the full model kept", tag_keys=depth
        )
        self.spec_rounds = metrics.Counter("adept_spec_decode_rounds", "speculative rounds verified", tag_keys=depth)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token(self, exit_layer: int) -> None:
        self.tokens.inc()
        self.exits.observe(exit_layer)

    def finished(self, reason: str, seconds: float, per_token: float | None, computed: int, full: int) -> None:
        self.finishes.inc(tags={"reason": reason})
        self.latency.observe(seconds)
        if per_token is not None:
            self.tpot.observe(per_token)
        if full:
            self.computed.inc(computed)
            self.full.inc(full)

    def scheduler(self, running: int, waiting: int, blocks_used: int, blocks_free: int, preemptions: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.blocks_used.set(blocks_used)
        self.blocks_free.set(blocks_free)
        if preemptions > self._preempted:
            self.preemptions.inc(preemptions - self._preempted)
            self._preempted = preemptions

    def recovered(self, seconds: float) -> None:
        self.recoveries.observe(seconds)

    def backfill(self, seconds: float | None, pending: int) -> None:
        self.backfill_pending.set(pending)
        if seconds is not None:
            self.backfill_seconds.observe(seconds)

    def speculated(self, depth: int, drafted: int, accepted: int) -> None:
        tags = {"draft_depth": str(depth)}
        self.spec_rounds.inc(tags=tags)
        if drafted:  # Ray's counters take only positive increments
            self.spec_drafted.inc(drafted, tags=tags)
        if accepted:
            self.spec_accepted.inc(accepted, tags=tags)


class ApiStats:
    """The ingress's: every API call ends in exactly one outcome (ok, aborted, or an error kind)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "adept_api_requests", "API calls by protocol and outcome", tag_keys=("protocol", "outcome")
        )

    def outcome(self, protocol: str, outcome: str) -> None:
        self.requests.inc(tags={"protocol": protocol, "outcome": outcome})


async def node_metrics() -> str:
    """This node's Prometheus export (Ray's metrics agent), as Prometheus would scrape it."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    (node,) = [n for n in ray.nodes() if n["NodeID"] == node_id]
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    return await asyncio.to_thread(fetch)
