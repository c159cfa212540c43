"""Outputs: each admitted request's stream, and what a step's results become in it. The engine's loop hands
every sequence update here; this module detokenizes, checks stop strings, EOS and length, assembles
RequestOutputs with usage, and reports each request's end to metrics and to its trace span."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from opentelemetry.trace import Span
from transformers import PreTrainedTokenizerBase

from serving.engine.detokenizer import Detokenizer
from serving.engine.messages import PromptScores, RequestOutput, Usage
from serving.engine.scheduler import ScheduledBatch, Sequence, SequenceUpdate
from serving.telemetry import tracing
from serving.telemetry.metrics import EngineStats
from workers.protocol import GroupSpec


@dataclass
class _Stream:
    seq: Sequence
    detok: Detokenizer
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    span: Span | None = None  # set when the request is traced


class RequestStream:
    """An admitted request: iterate for its outputs; closing it early aborts the request. A reader that
    falls behind the engine gets what queued up meanwhile as one output (fewer, larger chunks down the
    stream, as vLLM's output processor does), never a backlog of one-token messages."""

    def __init__(self, request_id: str, queue: asyncio.Queue, prompt_tokens: int, abort: Callable[[str], None]):
        self.request_id, self._queue, self.prompt_tokens = request_id, queue, prompt_tokens
        self._abort = abort
        self._done = False
        self._error: Exception | None = None  # queued behind outputs that were merged

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = self._error or await self._queue.get()
        except asyncio.CancelledError:  # the client went away
            self.abort()
            raise
        self._error = None
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            later = self._queue.get_nowait()
            if isinstance(later, Exception):
                self._error = later
                break
            item = item.merged(later)
        if isinstance(item, Exception):
            self._done = True
            raise item
        self._done = item.finished
        return item

    async def chunks(self, interval: int | Callable[[], int]) -> AsyncIterator[RequestOutput]:
        """The outputs, at least `interval` tokens to a chunk after the first token (vLLM's stream
        interval; a callable is asked again for each chunk): each chunk crossing processes costs about the
        same, so fewer, larger ones cost less per token under load. The first token and the end go out at
        once."""
        size = interval if callable(interval) else lambda: interval
        pending: RequestOutput | None = None
        first = True
        async for out in self:
            pending = out if pending is None else pending.merged(out)
            if first or pending.finished or len(pending.token_ids) >= size():
                first = False
                yield pending
                pending = None

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


# stream_interval "auto": one token a chunk while a pipeline runs up to this many sequences, beyond that
# enough tokens a chunk to keep about this many chunks per step (at most AUTO_MAX_INTERVAL tokens).
AUTO_CHUNKS_PER_STEP = 16
AUTO_MAX_INTERVAL = 8


def auto_interval(running: int) -> int:
    """The stream interval "auto" picks with `running` sequences in the pipeline: every token streams as
    it exists at light load; under heavy load the chunks grow, because each one costs the replica, the
    ingress and the proxy a message whatever it holds."""
    return min(AUTO_MAX_INTERVAL, max(1, math.ceil(running / AUTO_CHUNKS_PER_STEP)))


class OutputProcessor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: set[int] | frozenset[int] | list[int],
        num_layers: int,
        max_model_len: int,
        stats: EngineStats,
    ) -> None:
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids
        self.num_layers, self.max_model_len, self.stats = num_layers, max_model_len, stats
        self._streams: dict[str, _Stream] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def request_ids(self) -> list[str]:
        return list(self._streams)

    def add(self, seq: Sequence, span: Span | None, abort: Callable[[str], None]) -> RequestStream:
        stream = _Stream(seq, Detokenizer(self.tokenizer, seq.sampling.stop, seq.prompt_ids), span=span)
        self._streams[seq.request_id] = stream
        return RequestStream(seq.request_id, stream.queue, len(seq.prompt_ids), abort)

    def trace(self, batch: ScheduledBatch, groups: list[GroupSpec], sync: bool) -> tracing.StepTrace | None:
        """The batch's traced requests and their rows, if any is traced."""
        spans, start = [], 0
        for seq, n in zip(batch.seqs, batch.counts, strict=True):
            stream = self._streams.get(seq.request_id)
            if stream is not None and stream.span is not None:
                spans.append((stream.span, start, start + n))
            start += n
        return tracing.StepTrace(groups, spans, sync) if spans else None

    def deliver(self, update: SequenceUpdate) -> bool:
        """Turn a sequence's new token into an output; returns whether the sequence is done."""
        seq = update.seq
        stream = self._streams.get(seq.request_id)
        if stream is None or seq.aborted:
            if stream is not None:
                self.abort(seq)
            return True
        row = update.sampled
        if row is None:
            if update.prompt_done and seq.max_tokens == 0:  # the prompt scored, nothing to generate
                self._end(stream, "length")
                out = RequestOutput(seq.request_id, "", [], [], finished=True, finish_reason="length")
                out.prompt, out.usage = self._prompt(seq), self.usage(seq)
                stream.queue.put_nowait(out)
                return True
            return False  # a prompt chunk that did not reach the end of the prompt
        now = time.monotonic()
        first = stream.first_token is None
        if first:
            stream.first_token = now
            self.stats.first_token(now - stream.admitted)
        # Several new tokens (a verified speculative round) go out in order until one ends the request.
        new = len(row)
        tokens, base = row.tokens.tolist(), len(seq.output_ids) - new
        text, reason, n = "", None, 0
        for i, token in enumerate(tokens):
            n = i + 1
            self.stats.token(seq.exit_layers[base + i])
            text += stream.detok.add(token)
            if stream.detok.stopped or (token in self.eos_token_ids and not seq.sampling.ignore_eos):
                reason = "stop"
            elif base + n >= seq.max_tokens or seq.num_computed - (new - n) + 1 >= self.max_model_len:
                reason = "length"
            if reason is not None:
                break
        if n < new:  # tokens after the end are not the request's
            del seq.output_ids[base + n :], seq.exit_layers[base + n :]
            row = row.select(slice(0, n))
        if reason is not None:
            text += stream.detok.flush()
            self._end(stream, reason)
        k = seq.sampling.logprobs
        top = None
        if k is not None:
            pairs = zip(row.top_ids.tolist(), row.top_logprobs.tolist(), strict=True)
            top = [dict(zip(i[:k], v[:k], strict=True)) for i, v in pairs]
        stream.queue.put_nowait(
            RequestOutput(
                request_id=seq.request_id,
                text=text,
                token_ids=tokens[:n],
                exit_layers=seq.exit_layers[base : base + n],
                logprobs=None if k is None else row.logprobs.tolist(),
                top_logprobs=top,
                finished=reason is not None,
                finish_reason=reason,
                usage=None if reason is None else self.usage(seq),
                prompt=self._prompt(seq) if first else None,
                accepted=None if update.accepted is None else update.accepted[:n],
            )
        )
        return reason is not None

    @staticmethod
    def _prompt(seq: Sequence) -> PromptScores | None:
        if seq.sampling.prompt_logprobs is None:
            return None
        return PromptScores(
            token_ids=list(seq.prompt_ids),
            exit_layers=list(seq.prompt_exit_layers),
            logprobs=[None, *seq.prompt_logprobs],
            top_logprobs=[None, *seq.prompt_top_logprobs],
        )

    def abort(self, seq: Sequence) -> None:
        """End a stream without a new token."""
        stream = self._streams.get(seq.request_id)
        if stream is None:
            return
        self._end(stream, "abort")
        text = stream.detok.flush()
        stream.queue.put_nowait(
            RequestOutput(seq.request_id, text, [], [], finished=True, finish_reason="abort", usage=self.usage(seq))
        )

    def fail(self, seq: Sequence, error: Exception) -> None:
        """End a stream with an error (the client is told; no usage is reported)."""
        stream = self._streams.pop(seq.request_id, None)
        if stream is not None:
            stream.queue.put_nowait(error)

    def fail_all(self, error: Callable[[], Exception]) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(error())
        self._streams.clear()

    def usage(self, seq: Sequence) -> Usage:
        return Usage(
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            layers_computed=seq.layers_computed,
            layers_total=seq.num_computed * self.num_layers,
            prompt_layers_computed=seq.prompt_layers_computed,
            prompt_layers_total=min(seq.num_computed, len(seq.prompt_ids)) * self.num_layers,
            draft_tokens=0 if seq.spec is None else seq.spec.drafted,
            accepted_tokens=0 if seq.spec is None else seq.spec.accepted,
        )

    def _end(self, stream: _Stream, reason: str) -> None:
        """The request is over: no more outputs after the one being sent; report it."""
        self._streams.pop(stream.seq.request_id, None)
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
