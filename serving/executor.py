"""Running a batch through the layer groups of one pipeline.

`Pipeline` is shared by the in-process and the distributed engine; they differ only in the GroupHandle:
how a layer group is called and how its answers are fetched. A forward call returns three handles: the
small result (which the pipeline reads), the hidden states of the rows that continue (passed, unread, to
the next group), and the hidden states deeper groups need for back-fill (queued, unread, per group)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from workers.layer_group import LayerGroup
from workers.protocol import Backfill, BackfillRows, Rows, StepCall, StepResult

log = logging.getLogger(__name__)


class GroupHandle(Protocol):
    """A layer group as the pipeline sees it. Calls to one group take effect in submission order."""

    def forward(self, call: StepCall, hidden: Any, *backfill_hidden: Any) -> tuple[Any, Any, Any]: ...

    def backfill(self, backfills: list[BackfillRows], *backfill_hidden: Any) -> tuple[Any, Any]: ...

    def free(self, slots: torch.Tensor) -> Any: ...

    async def fetch(self, ref: Any) -> Any: ...

    def close(self) -> None: ...


@dataclass
class BatchResult:
    """Per row of the batch."""

    exit_depth: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


@dataclass
class _Pending:
    """Back-fill rows waiting for a group, and the (unread) hidden states they come from."""

    hidden: Any
    rows: BackfillRows


class Pipeline:
    """Back-fills of rows that exited early are queued per deeper group and travel with that group's next
    forward call (coalesced, never awaited on their own); groups no forward reaches get them in a call of
    their own once `flush_rows` pile up, also not awaited. `sync_backfill` instead sends and awaits every
    back-fill at once: the slow reference the benchmark compares against."""

    def __init__(self, groups: list[GroupHandle], flush_rows: int, sync_backfill: bool = False) -> None:
        self.groups = groups
        self.flush_rows = flush_rows
        self.sync_backfill = sync_backfill
        self._pending: list[list[_Pending]] = [[] for _ in groups]
        self._sent: set[asyncio.Task] = set()  # back-fill calls nobody waits for; failures are logged

    def pending_rows(self, group: int) -> int:
        return sum(len(p.rows) for p in self._pending[group])

    async def execute(self, rows: Rows) -> BatchResult:
        n = len(rows)
        exit_depth = torch.zeros(n, dtype=torch.int64)
        tokens = torch.full((n,), -1, dtype=torch.int64)
        logprobs = torch.full((n,), float("nan"))
        k = max(int(rows.logprobs.max()), 0) if n else 0
        top_ids = torch.full((n, k), -1, dtype=torch.int64)
        top_logprobs = torch.full((n, k), float("-inf"))
        ids = torch.arange(n)
        hidden = None
        for g, group in enumerate(self.groups):
            if len(rows) == 0:
                break
            # Queued back-fills travel with this call and take effect before its forward rows need them.
            pending, self._pending[g] = self._pending[g], []
            call = StepCall(rows, [p.rows for p in pending])
            result_ref, hidden, carry = group.forward(call, hidden, *(p.hidden for p in pending))
            result: StepResult = await group.fetch(result_ref)
            self._queue_carry(g, carry, result, rows, call.backfills)
            if self.sync_backfill:
                sent = [self._send(d) for d in range(g + 1, len(self.groups)) if self._pending[d]]
                await asyncio.gather(*(self.groups[d].fetch(ref) for d, ref in sent))
            done = ids[result.exited]
            exit_depth[done] = result.exit_depth
            tokens[done] = result.tokens
            logprobs[done] = result.logprobs
            top_ids[done] = result.top_ids
            top_logprobs[done] = result.top_logprobs
            keep = torch.ones(len(rows), dtype=torch.bool)
            keep[result.exited] = False
            ids, rows = ids[keep], rows.select(keep.nonzero().flatten())
        for g in range(1, len(self.groups)):
            if self.pending_rows(g) >= self.flush_rows:
                self._background(*self._send(g))
        return BatchResult(exit_depth, tokens, logprobs, top_ids, top_logprobs)

    def free(self, slots: list[int]) -> list[tuple[GroupHandle, Any]]:
        """Forget queued back-fills of finished sequences (nobody will read them) and clear their slots on
        every group. Submitted at once, so it precedes any later call that reuses the slots; returns what
        `confirm` awaits."""
        freed = torch.tensor(slots, dtype=torch.int64)
        for g, pending in enumerate(self._pending):
            kept = []
            for p in pending:
                live = ~torch.isin(p.rows.slots, freed)
                if bool(live.any()):
                    kept.append(_Pending(p.hidden, p.rows.select(live.nonzero().flatten())))
            self._pending[g] = kept
        return [(group, group.free(freed)) for group in self.groups]

    @staticmethod
    async def confirm(calls: list[tuple[GroupHandle, Any]]) -> None:
        for group, ref in calls:
            await group.fetch(ref)

    async def drain(self) -> None:
        """Wait for back-fill calls in flight (tests and shutdown)."""
        while self._sent:
            await asyncio.gather(*self._sent, return_exceptions=True)

    def _queue_carry(self, g: int, carry: Any, result: StepResult, rows: Rows, backfills: list[BackfillRows]) -> None:
        if g + 1 == len(self.groups) or result.carry.numel() == 0:
            return
        depth = torch.zeros(len(rows), dtype=torch.int64)
        depth[result.exited] = result.exit_depth
        forward = BackfillRows(rows.slots, rows.positions, depth, rows.backfill, torch.zeros_like(depth))
        self._queue(g, carry, BackfillRows.cat([forward, *backfills]).select(result.carry))

    def _queue(self, g: int, carry: Any, meta: BackfillRows) -> None:
        """Queue the rows whose hidden states `carry` holds (in order) for the groups after g."""
        meta.index = torch.arange(len(meta))
        exact = meta.backfill == Backfill.EXACT
        if bool(exact.any()):  # exact back-fill runs group by group: its output feeds the next group
            self._pending[g + 1].append(_Pending(carry, meta.select(exact.nonzero().flatten())))
        if bool((~exact).any()):  # decoupled/mapped: every deeper group works from the same exit state
            from_exit = meta.select((~exact).nonzero().flatten())
            for deeper in range(g + 1, len(self.groups)):
                self._pending[deeper].append(_Pending(carry, from_exit))

    def _send(self, g: int) -> tuple[int, Any]:
        """Submit a back-fill-only call to group g with everything queued for it; returns (g, result)."""
        pending, self._pending[g] = self._pending[g], []
        backfills = [p.rows for p in pending]
        result_ref, carry = self.groups[g].backfill(backfills, *(p.hidden for p in pending))
        if g + 1 < len(self.groups):  # a back-fill-only call carries its exact rows, in order
            rows = BackfillRows.cat(backfills)
            exact = (rows.backfill == Backfill.EXACT).nonzero().flatten()
            if exact.numel():
                self._queue(g, carry, rows.select(exact))
        return g, result_ref

    def _background(self, g: int, result_ref: Any) -> None:
        task = asyncio.get_running_loop().create_task(self.groups[g].fetch(result_ref))
        self._sent.add(task)
        task.add_done_callback(self._sent_done)

    def _sent_done(self, task: asyncio.Task) -> None:
        self._sent.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The rows' K/V stay missing: the completeness check fails the forward that would read them.
            log.error("a back-fill call failed", exc_info=task.exception())


class LocalGroup:
    """An in-process layer group: one thread of its own, so calls run one at a time in submission order,
    exactly like a synchronous Ray actor, while the event loop stays free."""

    def __init__(self, group: LayerGroup) -> None:
        self.group = group
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"layer-group-{group.spec.start}")

    def forward(self, call: StepCall, hidden: Any, *backfill_hidden: Any) -> tuple[Any, Any, Any]:
        future = self._thread.submit(lambda: self.group.step(call, _value(hidden), *map(_value, backfill_hidden)))
        return _Part(future, 0), _Part(future, 1), _Part(future, 2)

    def backfill(self, backfills: list[BackfillRows], *backfill_hidden: Any) -> tuple[Any, Any]:
        call = StepCall(Rows.empty(), backfills)
        future = self._thread.submit(lambda: self.group.step(call, None, *map(_value, backfill_hidden)))
        return _Part(future, 0), _Part(future, 2)

    def free(self, slots: torch.Tensor) -> Any:
        return _Part(self._thread.submit(self.group.free, slots), None)

    async def fetch(self, ref: _Part) -> Any:
        value = await asyncio.wrap_future(ref.future)
        return value if ref.index is None else value[ref.index]

    def close(self) -> None:
        self._thread.shutdown(wait=True)


@dataclass
class _Part:
    """One of the values a local call returns; reading it waits for the call."""

    future: Future
    index: int | None

    def result(self) -> Any:
        value = self.future.result()
        return value if self.index is None else value[self.index]


def _value(x: Any) -> Any:
    return x.result() if isinstance(x, _Part) else x
