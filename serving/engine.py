"""The engine: requests in, streams of (token, exit layer) out. One asyncio loop schedules batches and hands
them to a Pipeline; the in-process engine and the distributed one differ only in the pipeline's groups."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from opentelemetry.trace import Span
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from serving import tracing
from serving.config import EngineConfig
from serving.detokenizer import Detokenizer
from serving.exceptions import EngineError, EngineUnavailable, RequestError
from serving.executor import BatchResult, GroupHandle, LocalGroup, Pipeline, Submitted
from serving.messages import RequestOutput, Usage
from serving.metrics import EngineStats
from serving.params import ExitParams, SamplingParams, request_error, resolve_exit
from serving.plan import PipelinePlan, plan_pipeline
from serving.scheduler import ScheduledBatch, Scheduler, Sequence, SequenceUpdate
from workers.arch import ModelArch
from workers.device import resolve_device, resolve_dtype
from workers.exit_pack import ExitPack, load_pack
from workers.layer_group import LayerGroup
from workers.model_store import load_config, load_tokenizer, resolve_model

log = logging.getLogger(__name__)

GroupFactory = Callable[[Path, PipelinePlan, ExitPack | None], list[GroupHandle]]


@dataclass
class _Stream:
    seq: Sequence
    detok: Detokenizer
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    span: Span | None = None  # set when the request is traced


@dataclass
class _TracedStep:
    """A step with traced requests: each gets a span per layer-group call that computed or back-filled its
    rows (which rows a group touched follows from their exit depths and the group's layers)."""

    plan: PipelinePlan
    spans: list[tuple[Span, int, int]]  # (request span, its rows in the batch)
    sync: bool
    depths: torch.Tensor | None = None

    def computed(self, result: BatchResult) -> None:
        self.depths = result.results.exit_layer
        for g, timing in enumerate(result.timings):
            self._record(g, timing, backfill_only=False)

    def backfilled(self, group: int, timing: tuple[int, int]) -> None:
        if self.depths is not None:
            self._record(group, timing, backfill_only=True)

    def _record(self, g: int, timing: tuple[int, int], backfill_only: bool) -> None:
        spec = self.plan.groups[g]
        for span, start, end in self.spans:
            depths = self.depths[start:end]
            entered = int((depths > spec.start).sum())
            if entered:
                call = tracing.GroupCall((spec.start, spec.end), timing, entered, False, False)
                tracing.record_call(span, call)
            if len(depths) - entered:
                off = backfill_only and not self.sync
                call = tracing.GroupCall((spec.start, spec.end), timing, len(depths) - entered, True, off)
                tracing.record_call(span, call)


class RequestStream:
    """An admitted request: iterate for its outputs; closing it early aborts the request."""

    def __init__(self, engine: Engine, request_id: str, queue: asyncio.Queue, prompt_tokens: int) -> None:
        self.engine, self.request_id, self._queue = engine, request_id, queue
        self.prompt_tokens = prompt_tokens
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:  # the client went away
            self.abort()
            raise
        if isinstance(item, Exception):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        plan: PipelinePlan,
        pipeline: Pipeline,
        tokenizer: PreTrainedTokenizerBase,
        arch: ModelArch,
        pack: ExitPack | None,
        stats: EngineStats | None = None,
    ) -> None:
        self.config, self.plan, self.pipeline, self.tokenizer = config, plan, pipeline, tokenizer
        self.arch, self.pack = arch, pack
        self.stats = stats or EngineStats()
        pipeline.stats = self.stats
        # Policy learned needs a trained router at every early exit point (configured points may differ).
        early = [d for d in plan.exit_points if d < plan.num_layers]
        routed = pack is not None and all(pack.prefixed(f"router.{d}.") for d in early)
        self.limits = plan.limits(routed)
        # Requests' unset exit controls: the configuration's, else what the exit pack was tuned for.
        tuned = pack.defaults if routed else {}
        self.exit_defaults = ExitParams.model_validate({**tuned, **config.exit.model_dump(exclude_none=True)})
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting_requests)
        self._streams: dict[str, _Stream] = {}
        self._inflight: set[asyncio.Task] = set()  # one task per micro-batch in the pipeline
        # Every call to the workers is made in this context, never in a request's: on Ray, calls made while
        # serving a request count as its children, and cancelling the request (its client left) would
        # cancel them mid-pipeline, under every other request's feet.
        self._context = contextvars.Context()
        self._background: set[asyncio.Task] = set()
        self._recovery: asyncio.Task | None = None  # rebuilding the KV cache after a worker was lost
        self.broken: str | None = None  # why this pipeline cannot serve any more (a worker lost for good)

    @classmethod
    def build(
        cls, config: EngineConfig, make_groups: GroupFactory, stats: Callable[[PipelinePlan], EngineStats] | None = None
    ) -> Engine:
        """An engine whose layer groups `make_groups(model_path, plan, exit_pack)` creates; `stats(plan)`
        makes what it reports to."""
        path = resolve_model(config.model)
        arch = ModelArch.from_config(load_config(path))
        pack = load_pack(config.exit_pack, config.model, path)
        plan = plan_pipeline(config, arch, pack.exit_points if pack is not None else None)
        groups = make_groups(path, plan, pack)
        pipeline = Pipeline(groups, config.sync_backfill)
        return cls(config, plan, pipeline, load_tokenizer(path), arch, pack, stats(plan) if stats else None)

    @classmethod
    def local(cls, config: EngineConfig) -> Engine:
        """The in-process engine: every layer group in this process, each on its own thread."""
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)

        def make_groups(path: Path, plan: PipelinePlan, pack: ExitPack | None) -> list[GroupHandle]:
            return [LocalGroup(LayerGroup.load(path, spec, pack, device, dtype)) for spec in plan.groups]

        return cls.build(config, make_groups)

    # ---- requests ------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def submit(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | dict | None = None,
        exit: ExitParams | dict | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Admit a request (raises RequestError or QueueFullError at once) and return its output stream."""
        request_id = request_id or uuid.uuid4().hex
        if self.broken:
            raise EngineUnavailable(f"this pipeline cannot serve: {self.broken}; retry the request")
        if request_id in self._streams:
            raise RequestError("request_id", f"{request_id!r} is already in use")
        try:
            sampling = SamplingParams.model_validate(sampling or {})
        except ValidationError as e:
            raise request_error(e) from None
        try:
            exit_params = ExitParams.model_validate(exit or {})
        except ValidationError as e:
            raise request_error(e, "adept.") from None
        resolved = resolve_exit(exit_params, self.exit_defaults, self.limits)
        prompt_ids = self._prompt_ids(prompt)
        room = self.plan.max_model_len - len(prompt_ids)
        cap = self.config.max_tokens_limit
        if cap is not None and sampling.max_tokens is not None and sampling.max_tokens > cap:
            raise RequestError(
                "max_tokens", f"{sampling.max_tokens} is over this server's limit (max_tokens_limit {cap})"
            )
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise RequestError(
                "max_tokens",
                f"{sampling.max_tokens} new tokens do not fit: the context holds {self.plan.max_model_len} "
                f"tokens and the prompt has {len(prompt_ids)}",
            )
        seq = Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            exit=resolved,
            seed=sampling.seed if sampling.seed is not None else secrets.randbits(62),
            max_tokens=sampling.max_tokens or min(room, cap or room),
        )
        self.scheduler.add(seq)
        stream = _Stream(seq, Detokenizer(self.tokenizer, sampling.stop, prompt_ids))
        stream.span = tracing.start_request(self.config.model, len(prompt_ids), resolved.name)
        self._streams[request_id] = stream
        self._in_engine(self._launch)
        return RequestStream(self, request_id, stream.queue, len(prompt_ids))

    async def generate(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | dict | None = None,
        exit: ExitParams | dict | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        stream = self.submit(prompt, sampling, exit, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        seq = self.scheduler.abort(request_id)
        if seq is not None:  # not in flight: free it now; otherwise when its batch returns
            self._finish(stream, "abort")
            self._in_engine(self._release, [seq])

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.arch.vocab_size]
            if bad:
                raise RequestError(
                    "prompt", f"token id {bad[0]!r} is outside the vocabulary [0, {self.arch.vocab_size})"
                )
        if not ids:
            raise RequestError("prompt", "must not be empty")
        cap = self.config.max_prompt_tokens
        if cap is not None and len(ids) > cap:
            raise RequestError("prompt", f"{len(ids)} tokens is over this server's limit (max_prompt_tokens {cap})")
        if len(ids) >= self.plan.max_model_len:
            raise RequestError(
                "prompt",
                f"{len(ids)} tokens is too long: the context holds {self.plan.max_model_len} tokens, prompt "
                "and generated together",
            )
        return ids

    # ---- the loop ------------------------------------------------------------------------------------

    def _in_engine(self, fn: Callable[..., None], *args: object) -> None:
        asyncio.get_running_loop().call_soon(fn, *args, context=self._context)

    def _launch(self) -> None:
        """Schedule and submit micro-batches until the pipeline holds as many as configured. Called whenever
        that may change (a request arrives, a batch returns); it submits to the workers before the event
        loop runs anything else, so streaming the last tokens out never delays the next step."""
        if self._recovery is not None or self.broken:
            return
        while len(self._inflight) < self.config.max_inflight_batches:
            batch = self.scheduler.schedule(self._batch_seqs())
            self._report_scheduler()
            if batch is None:
                return
            task = asyncio.get_running_loop().create_task(self._step(batch, self.pipeline.submit(batch.rows)))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _report_scheduler(self) -> None:
        slots = self.scheduler.slots
        running = len(self.scheduler.running)
        self.stats.scheduler(running, len(self.scheduler.waiting), slots.capacity - slots.num_free, slots.num_free)

    def _batch_seqs(self) -> int:
        """Sequences per micro-batch: the work split evenly over the micro-batches in flight, so that while
        group g runs one micro-batch, group g+1 has another (layer-group pipelining)."""
        work = len(self.scheduler.running) + len(self.scheduler.waiting)
        return max(1, -(-work // self.config.max_inflight_batches))

    async def _step(self, batch: ScheduledBatch, submitted: Submitted) -> None:
        traced = self._traced(batch)
        try:
            result: BatchResult = await self.pipeline.collect(submitted, traced.backfilled if traced else None)
        except Exception as e:
            if self.pipeline.lost_worker(e) and not self.broken:  # rebuild, then go on where they stopped
                for seq in batch.seqs:
                    seq.in_flight = False
                if self._recovery is None:
                    self._recovery = self._in_task(self._recover(e))
                self._inflight.discard(asyncio.current_task())
                return
            # anything else: fail this batch's requests, keep serving the rest
            log.exception("a batch of %d requests failed", len(batch.seqs))
            for seq in batch.seqs:
                seq.in_flight = False
                stream = self._streams.pop(seq.request_id, None)
                if stream is not None:
                    stream.queue.put_nowait(EngineError(f"request {seq.request_id} failed in the engine: {e}"))
            self._release(batch.seqs)
        else:
            if traced:
                traced.computed(result)
            updates = self.scheduler.update(batch, result.results)
            self._release([u.seq for u in updates if self._deliver(u)])
        self._inflight.discard(asyncio.current_task())
        self._launch()

    @property
    def recovering(self) -> bool:
        return self._recovery is not None

    def _in_task(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine, context=self._context)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _recover(self, error: BaseException) -> None:
        """A worker died: wait for the other micro-batches to end, for Ray to restart the worker (with its
        layers, without its cache), clear every running sequence's slot on every worker, and let the
        scheduler feed each one's prompt and generated tokens again; its next token continues the stream."""
        started = time.monotonic()
        log.warning("a layer-group worker was lost (%s); waiting for its restart", str(error).splitlines()[0])
        others = [t for t in self._inflight if t is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)
        try:
            await self.pipeline.ready(self.config.worker_restart_timeout_s)
            running = [s for s in self.scheduler.running if s.slot is not None]
            if running:
                await Pipeline.confirm(self.pipeline.free([s.slot for s in running]))
        except Exception as e:
            self._give_up(f"a layer-group worker did not come back: {str(e).splitlines()[0]}")
            return
        finally:
            self._recovery = None
        rebuilt = self.scheduler.rebuild()
        gone = [s for s in rebuilt if s.aborted]  # their clients left during the failure
        for seq in gone:
            stream = self._streams.get(seq.request_id)
            if stream is not None:
                self._finish(stream, "abort")
        self._release(gone)
        elapsed = time.monotonic() - started
        self.stats.recovered(elapsed)
        log.warning("worker back after %.1f s: rebuilding the KV cache of %d sequences", elapsed, len(rebuilt))
        self._launch()

    def _give_up(self, reason: str) -> None:
        """No way back for this pipeline: every admitted request ends with a retryable error, every slot is
        released, and the router reports itself unhealthy so that Serve replaces it."""
        log.error("%s: failing %d requests", reason, len(self._streams))
        self.broken = reason
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(EngineUnavailable(f"{reason}; retry the request"))
        self._streams.clear()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(seq)
        self.scheduler.waiting.clear()

    def _deliver(self, update: SequenceUpdate) -> bool:
        """Turn a sequence's new token into an output; returns whether the sequence is done."""
        seq = update.seq
        stream = self._streams.get(seq.request_id)
        if stream is None or seq.aborted:
            if stream is not None:
                self._finish(stream, "abort")
            return True
        if update.sampled is None:  # a prompt chunk that did not reach the end of the prompt
            return False
        token, exit_layer = update.token, seq.exit_layers[-1]
        now = time.monotonic()
        if stream.first_token is None:
            stream.first_token = now
            self.stats.first_token(now - stream.admitted)
        self.stats.token(exit_layer)
        text = stream.detok.add(token)
        reason = None
        if stream.detok.stopped or (token in self.arch.eos_token_ids and not seq.sampling.ignore_eos):
            reason = "stop"
        elif len(seq.output_ids) >= seq.max_tokens or seq.num_computed + 1 >= self.plan.max_model_len:
            reason = "length"
        if reason is not None:
            text += stream.detok.flush()
            self._streams.pop(seq.request_id, None)
            self._report_finish(stream, reason)
        k = seq.sampling.logprobs
        row = update.sampled
        stream.queue.put_nowait(
            RequestOutput(
                request_id=seq.request_id,
                text=text,
                token_ids=[token],
                exit_layers=[exit_layer],
                logprobs=None if k is None else [float(row.logprobs[0])],
                top_logprobs=None
                if k is None
                else [{int(i): float(lp) for i, lp in zip(row.top_ids[0, :k], row.top_logprobs[0, :k], strict=True)}],
                finished=reason is not None,
                finish_reason=reason,
                usage=None if reason is None else self.usage(seq),
            )
        )
        return reason is not None

    def _report_finish(self, stream: _Stream, reason: str) -> None:
        now, seq = time.monotonic(), stream.seq
        n = len(seq.output_ids)
        per_token = (now - stream.first_token) / (n - 1) if stream.first_token is not None and n > 1 else None
        usage = self.usage(seq)
        self.stats.finished(reason, now - stream.admitted, per_token, usage.layers_computed, usage.layers_total)
        if stream.span is not None:
            attributes = {
                "adept.completion_tokens": n,
                "adept.finish_reason": reason,
                "adept.layers_computed": usage.layers_computed,
                "adept.layers_total": usage.layers_total,
            }
            if stream.first_token is not None:
                attributes["adept.time_to_first_token_s"] = stream.first_token - stream.admitted
            if seq.exit_layers:
                attributes["adept.mean_exit_depth"] = sum(seq.exit_layers) / len(seq.exit_layers)
            tracing.end_request(stream.span, attributes)

    def _traced(self, batch: ScheduledBatch) -> _TracedStep | None:
        spans, start = [], 0
        for seq, n in zip(batch.seqs, batch.counts, strict=True):
            stream = self._streams.get(seq.request_id)
            if stream is not None and stream.span is not None:
                spans.append((stream.span, start, start + n))
            start += n
        return _TracedStep(self.plan, spans, self.pipeline.sync_backfill) if spans else None

    def _finish(self, stream: _Stream, reason: str) -> None:
        """End a stream without a new token (abort)."""
        seq = stream.seq
        self._streams.pop(seq.request_id, None)
        self._report_finish(stream, reason)
        text = stream.detok.flush()
        stream.queue.put_nowait(
            RequestOutput(seq.request_id, text, [], [], finished=True, finish_reason=reason, usage=self.usage(seq))
        )

    def usage(self, seq: Sequence) -> Usage:
        return Usage(
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            layers_computed=seq.layers_computed,
            layers_total=seq.num_computed * self.plan.num_layers,
        )

    def _release(self, seqs: list[Sequence]) -> None:
        slots = [s for s in (self.scheduler.finish(seq) for seq in seqs) if s is not None]
        if not slots:
            return
        self._in_task(self._confirm_free(self.pipeline.free(slots)))

    async def _confirm_free(self, calls) -> None:
        try:
            await Pipeline.confirm(calls)
        except Exception as e:  # a lost worker's cache is gone anyway; recovery clears the others
            log.warning("freeing slots failed: %s", str(e).splitlines()[0])

    async def drain(self) -> None:
        """Wait until every admitted request has finished and every slot is cleared on the workers."""
        while self.scheduler.has_work or self._background:
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(EngineError("the engine is shutting down"))
        self._streams.clear()
        await self.pipeline.drain()
        for group in self.pipeline.groups:
            group.close()
