"""The engine: requests in, streams of (token, exit layer) out.

One asyncio loop does what vLLM's EngineCore.step does: schedule a batch (scheduler.py), execute it through
the layer groups (pipeline.py), and update the sequences and their streams with the results (outputs.py), all
in this package; admission checks live in admission.py. The in-process engine and the distributed one differ
only in the pipeline's group handles.

Rule: every call to the workers is made in the engine's own context, never in a request's. On Ray, calls
made while serving a request count as its children, and cancelling the request (its client left) would
cancel them mid-pipeline, under every other request's feet. Methods that call the workers are marked
`@_engine_context` (they raise when run elsewhere) and are started with `_soon` or `_spawn`; the public
calls that reach the workers (teacher_forced, workers, kv_blocks) go through `_spawn`."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from serving.engine.admission import Admission
from serving.engine.config import EngineConfig
from serving.engine.exceptions import EngineError, EngineUnavailable, RequestError, first_line
from serving.engine.messages import RequestOutput
from serving.engine.outputs import OutputProcessor, RequestStream
from serving.engine.params import ExitParams, PhaseExits, SamplingParams
from serving.engine.pipeline import GroupHandle, LocalGroup, Pipeline, Submitted
from serving.engine.plan import PipelinePlan, plan_pipeline
from serving.engine.scheduler import ScheduledBatch, Scheduler, Sequence, TeacherForcing, check_kv_capacity
from serving.engine.speculative import SpeculativeParams
from serving.telemetry import tracing
from serving.telemetry.metrics import EngineStats
from workers.arch import ModelArch
from workers.device import resolve_device, resolve_dtype
from workers.exit_pack import ExitPack, load_pack
from workers.kv_cache import BlockPool
from workers.layer_group import LayerGroup
from workers.model_store import load_config, load_tokenizer, resolve_model
from workers.protocol import TokenResults

log = logging.getLogger(__name__)

GroupFactory = Callable[[Path, PipelinePlan, ExitPack | None], list[GroupHandle]]
F = TypeVar("F", bound=Callable[..., Any])

_IN_ENGINE: contextvars.ContextVar[bool] = contextvars.ContextVar("adept_in_engine", default=False)


def _engine_context(method: F) -> F:
    """Marks a method that calls the workers: it must run in the engine's context (see the module's rule)."""

    def check() -> None:
        if not _IN_ENGINE.get():
            raise RuntimeError(f"Engine.{method.__name__} calls the workers: run it with Engine._soon/_spawn")

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            check()
            return await method(*args, **kwargs)

        return run_async  # type: ignore[return-value]

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        check()
        return method(*args, **kwargs)

    return run  # type: ignore[return-value]


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        plan: PipelinePlan,
        pipeline: Pipeline,
        tokenizer: PreTrainedTokenizerBase,
        arch: ModelArch,
        pack: ExitPack | None,
    ) -> None:
        self.config, self.plan, self.pipeline, self.tokenizer = config, plan, pipeline, tokenizer
        self.arch, self.pack, self.stats = arch, pack, pipeline.stats
        self.admission = Admission(config, plan, tokenizer, arch, pack)
        self.scheduler = Scheduler(
            BlockPool(min(g.num_blocks for g in pipeline.groups)), config.block_size, config.max_num_seqs,
            config.max_num_batched_tokens, config.max_waiting_requests, plan.max_model_len,
            self.admission.speculative_max_batch,
        )  # fmt: skip
        check_kv_capacity(self.scheduler.pool, config.block_size, plan.max_model_len, pipeline.block_bytes)
        self.outputs = OutputProcessor(tokenizer, arch.eos_token_ids, plan.num_layers, plan.max_model_len, self.stats)
        self._inflight: set[asyncio.Task] = set()  # one task per micro-batch in the pipeline
        self._context = contextvars.Context()
        self._context.run(_IN_ENGINE.set, True)
        self._background: set[asyncio.Task] = set()
        self._recovery: asyncio.Task | None = None  # rebuilding the KV cache after a worker was lost
        self.broken: str | None = None  # why this pipeline cannot serve any more (a worker lost for good)
        self.closing = False  # the server is stopping: no new requests

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
        pipeline = Pipeline(groups, config.sync_backfill, stats(plan) if stats else EngineStats())
        return cls(config, plan, pipeline, load_tokenizer(path), arch, pack)

    @classmethod
    def local(cls, config: EngineConfig) -> Engine:
        """The in-process engine: every layer group in this process, each on its own thread."""
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)

        def make_groups(path: Path, plan: PipelinePlan, pack: ExitPack | None) -> list[GroupHandle]:
            return [LocalGroup(LayerGroup.load(path, spec, pack, device, dtype)) for spec in plan.groups]

        return cls.build(config, make_groups)

    @property
    def exit_defaults(self) -> ExitParams:
        return self.admission.exit_defaults

    @property
    def num_running(self) -> int:
        """Sequences in the running batch."""
        return len(self.scheduler.running)

    @property
    def kv_cache_tokens(self) -> int:
        return self.scheduler.pool.capacity * self.config.block_size

    # ---- requests ------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.admission.chat_prompt(messages)

    def submit(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | dict | None = None,
        exit: ExitParams | dict | None = None,
        request_id: str | None = None,
        speculative: SpeculativeParams | dict | None = None,
    ) -> RequestStream:
        """Admit a request (raises RequestError or QueueFullError at once) and return its output stream.
        `speculative`: its speculative decoding (None: the server's default)."""
        request_id = request_id or uuid.uuid4().hex
        if self.broken:
            raise EngineUnavailable(f"this pipeline cannot serve: {self.broken}; retry the request")
        if self.closing:
            raise EngineUnavailable("the server is shutting down; retry the request on another server")
        if request_id in self.outputs:
            raise RequestError("request_id", f"{request_id!r} is already in use")
        seq = self.admission.sequence(request_id, prompt, sampling, exit, speculative)
        self.scheduler.add(seq)
        span = tracing.start_request(self.config.model, len(seq.prompt_ids), seq.exit.decode.name)
        stream = self.outputs.add(seq, span, self.abort)
        self._soon(self._launch)
        return stream

    async def generate(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | dict | None = None,
        exit: ExitParams | dict | None = None,
        request_id: str | None = None,
        speculative: SpeculativeParams | dict | None = None,
    ) -> AsyncIterator[RequestOutput]:
        stream = self.submit(prompt, sampling, exit, request_id, speculative)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        if request_id not in self.outputs:
            return
        seq = self.scheduler.abort(request_id)
        if seq is not None:  # not in flight: free it now; otherwise when its batch returns
            self.outputs.abort(seq)
            self._soon(self._release, [seq])

    async def teacher_forced(
        self, token_ids: list[list[int]], exit: ExitParams | dict | None = None, chunk: int = 128,
        exit_every: int = 1, exit_from: list[int] | None = None, as_prompt: bool = False,
    ) -> list[TokenResults]:  # fmt: skip
        """Run given token sequences through the model, beside the engine's own requests: every position
        exits where `exit` says for prompt tokens (its deeper K/V back-filled as served), predicts its next
        token greedily at its exit and scores the sequence's actual next token, as echo scoring of the same
        prompt does. Per sequence, one row per position (`exit_every`, `exit_from`, `as_prompt`, which
        phase's heads decide: see TeacherForcing)."""
        exits = PhaseExits.same(self.admission.resolve_exit(exit).prefill)
        forced = self.scheduler.teacher_forcing(
            token_ids, exits, self.plan.max_model_len, chunk, exit_every, exit_from, as_prompt
        )
        # Shielded: a caller that gives up does not cancel worker calls mid-pipeline; the run ends and frees.
        return await asyncio.shield(self._spawn(self._teacher_forced(forced)))

    # ---- the loop ------------------------------------------------------------------------------------

    def _soon(self, fn: Callable[..., None], *args: object) -> None:
        asyncio.get_running_loop().call_soon(fn, *args, context=self._context)

    def _spawn(self, coroutine: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine, context=self._context)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @_engine_context
    def _launch(self) -> None:
        """Schedule and submit micro-batches until the pipeline holds as many as configured. Called whenever
        that may change (a request arrives, a batch returns); it submits to the workers before the event
        loop runs anything else, so streaming the last tokens out never delays the next step."""
        if self._recovery is not None or self.broken:
            return
        while len(self._inflight) < self.config.max_inflight_batches:
            rejected = self.scheduler.take_rejected()  # forgotten before any call reads those positions again
            if rejected is not None:
                self._spawn(Pipeline.confirm(self.pipeline.rollback(*rejected), quiet=True))
            batch = self.scheduler.schedule(self.scheduler.per_micro_batch(self.config.max_inflight_batches))
            self._free(self.scheduler.take_freed())  # preempted: cleared before any call reuses the blocks
            self.stats.scheduler(*self.scheduler.gauges())
            if batch is None:
                return
            trace = self.outputs.trace(batch, self.plan.groups, self.pipeline.sync_backfill)
            listener = trace.trailing_call if trace else None
            submitted = self.pipeline.submit(batch.rows, listener, batch.hidden, batch.depth)
            task = asyncio.get_running_loop().create_task(self._step(batch, submitted, trace))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    @_engine_context
    async def _step(self, batch: ScheduledBatch, submitted: Submitted, trace: tracing.StepTrace | None) -> None:
        """Collect a batch's results, update its sequences and streams, release the finished ones, and
        schedule the next batch."""
        try:
            result = await self.pipeline.collect(submitted)
        except Exception as e:
            self._failed(batch, e)
        else:
            if trace:
                trace.computed(result.results.exit_layer, result.timings, submitted.start)
            updates = self.scheduler.update(batch, result.results, result.draft_hidden)
            if batch.verifies:  # each update is a round
                for u in updates:
                    self.stats.speculated(u.seq.spec.config.depth, u.drafted, sum(u.accepted))
            self._release([u.seq for u in updates if self.outputs.deliver(u)])
        self._inflight.discard(asyncio.current_task())
        self._launch()

    def _failed(self, batch: ScheduledBatch, error: Exception) -> None:
        for seq in batch.seqs:
            seq.in_flight = False
        if self.pipeline.lost_worker(error) and not self.broken:  # rebuild, then go on where they stopped
            if self._recovery is None:
                self._recovery = self._spawn(self._recover(error))
            return
        # anything else: fail this batch's requests, keep serving the rest
        log.error("a batch of %d requests failed", len(batch.seqs), exc_info=error)
        for seq in batch.seqs:
            self.outputs.fail(seq, EngineError(f"request {seq.request_id} failed in the engine: {error}"))
        self._release(batch.seqs)

    @_engine_context
    def _release(self, seqs: list[Sequence]) -> None:
        """Drop finished sequences and clear their blocks on every worker."""
        self._free([b for seq in seqs for b in self.scheduler.remove(seq)])

    @_engine_context
    def _free(self, blocks: list[int]) -> None:
        if blocks:
            self._spawn(Pipeline.confirm(self.pipeline.free(blocks), quiet=True))

    @_engine_context
    async def _teacher_forced(self, forced: TeacherForcing) -> list[TokenResults]:
        try:
            while (rows := forced.next_rows()) is not None:
                forced.record((await self.pipeline.execute(rows)).results)
        finally:
            blocks = [b for seq in forced.seqs for b in self.scheduler.remove(seq)]
            await Pipeline.confirm(self.pipeline.free(blocks))
        return forced.results()

    # ---- recovery ------------------------------------------------------------------------------------

    @_engine_context
    async def _recover(self, error: BaseException) -> None:
        """A worker died: wait for the other micro-batches to end, for Ray to restart the worker (with its
        layers, without its cache), clear every running sequence's blocks on every worker, and let the
        scheduler feed each one's prompt and generated tokens again; its next token continues the stream."""
        started = time.monotonic()
        log.warning("a layer-group worker was lost (%s); waiting for its restart", first_line(error))
        await asyncio.gather(*self._inflight, return_exceptions=True)
        try:
            await self.pipeline.ready(self.config.worker_restart_timeout_s)
            self.pipeline.discard_owed()  # every running sequence's K/V is cleared and rebuilt anyway
            held = [b for s in self.scheduler.running for b in s.blocks]
            if held:
                await Pipeline.confirm(self.pipeline.free(held))
        except Exception as e:
            self._give_up(f"a layer-group worker did not come back: {first_line(e)}")
            return
        finally:
            self._recovery = None
        rebuilt = self.scheduler.rebuild()
        gone = [s for s in rebuilt if s.aborted]  # their clients left during the failure
        for seq in gone:
            self.outputs.abort(seq)
        self._release(gone)
        elapsed = time.monotonic() - started
        self.stats.recovered(elapsed)
        log.warning("worker back after %.1f s: rebuilding the KV cache of %d sequences", elapsed, len(rebuilt))
        self._launch()

    def _give_up(self, reason: str) -> None:
        """No way back for this pipeline: every admitted request ends with a retryable error, every block is
        released, and the replica reports itself unhealthy so that Serve replaces it."""
        log.error("%s: failing %d requests", reason, len(self.outputs))
        self.broken = reason
        self.outputs.fail_all(lambda: EngineUnavailable(f"{reason}; retry the request"))
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.remove(seq)
        self.scheduler.waiting.clear()

    # ---- operations ----------------------------------------------------------------------------------

    async def workers(self) -> list[dict]:
        """Each layer group's layers, process id, KV pool size and occupied blocks (operators, the tests)."""
        return await self._spawn(self.pipeline.info())

    async def kv_blocks(self) -> dict:
        """KV blocks: the pool's capacity and free ones, and those holding K/V on each worker (None when
        the pipeline lost a worker for good: it has nothing to report)."""
        occupied = None if self.broken else [w["occupied"] for w in await self.workers()]
        return {"capacity": self.scheduler.pool.capacity, "free": self.scheduler.pool.num_free, "workers": occupied}

    async def drain(self) -> None:
        """Wait until every admitted request has finished and every block is cleared on the workers."""
        while self.scheduler.has_work or self._background:
            await asyncio.sleep(0.01)

    async def close(self, grace_s: float) -> int:
        """Refuse new requests, give the admitted ones `grace_s` seconds to finish, then end the rest with
        finish_reason "abort" and clear their blocks (a server stopping). Returns how many were cut."""
        self.closing = True
        deadline = time.monotonic() + grace_s
        while len(self.outputs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = self.outputs.request_ids()
        for request_id in cut:
            self.abort(request_id)
        await self.drain()
        return len(cut)

    async def shutdown(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        self.outputs.fail_all(lambda: EngineError("the engine is shutting down"))
        await self.pipeline.drain()
        self.pipeline.close()
