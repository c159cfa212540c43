"""Running a batch through the layer groups of one pipeline.

`Pipeline` is shared by the in-process and the distributed engine; they differ only in the GroupHandle:
how a layer group is called and how its answers are fetched. A batch's calls to every group are submitted
at once, each taking the previous one's Continuing (the rows that go on, their hidden states, and the
back-fills owed by this step's early exits), so the batch flows group to group without a round trip
through the pipeline, which reads only the small results. As soon as every row of the batch has exited the
batch is done: the calls still running on deeper groups only back-fill, and nothing waits for them (unless
`sync_backfill`, the slow reference the benchmark compares against).

A group that no row of a batch can reach (every row's exit controls stop it earlier: static depths, max_depth)
gets no call for that batch: what it owes is kept (the previous group's output, by reference) and goes in
front of its next call, which comes with the next batch that reaches it, or when OWED_CALLS have piled up,
before any free, and on drain. One call back-fills many steps at once, and a static-depth stream pays for
the groups it uses.

Rule: a back-fill must land before any later forward that reads it. That holds because each group runs its
calls one at a time in submission order (LocalGroup: one thread; RayGroup: a synchronous actor) and has
exactly one caller, its pipeline: a group handle joins one Pipeline only (checked when it is built)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from serving.engine.exceptions import first_line
from serving.telemetry.metrics import EngineStats
from workers.layer_group import LayerGroup
from workers.modes import Backfill, Policy
from workers.protocol import Continuing, GroupSpec, Rows, SkippedRows, StepResult, TokenResults

log = logging.getLogger(__name__)

# A group no batch reaches gets its owed back-fills in one call once this many batches' worth have piled up.
OWED_CALLS = 16


class GroupHandle(Protocol):
    """A layer group as the pipeline sees it. Calls to one group take effect in submission order."""

    pipeline: Pipeline | None  # the one pipeline that calls it
    spec: GroupSpec  # its layers and exit points
    num_blocks: int  # KV blocks in the group's pool
    block_bytes: int  # bytes of one block (K and V of block_size positions of the group's layers)

    def forward(self, batch: Any, owed: list[Any]) -> tuple[Any, Any]:
        """Run `batch` (Rows, or the previous group's output), after the back-fills of the earlier outputs
        `owed` to this group (back-fill only: no rows reached it). Returns (result, output), unread."""
        ...

    def free(self, blocks: torch.Tensor) -> Any: ...

    def rollback(self, block_table: torch.Tensor, positions: torch.Tensor) -> Any:
        """Forget the K/V of single positions (rejected speculative drafts)."""
        ...

    def info(self) -> Any:
        """The group's layers, process id, KV pool size and occupied blocks."""
        ...

    async def fetch(self, ref: Any) -> Any: ...

    def lost(self, error: BaseException) -> bool:
        """Whether `error` means the group's worker died and may come back (restarted, its cache empty)."""
        ...

    async def ready(self, timeout: float) -> None:
        """Return once the group answers again; raise if it will not (within `timeout` seconds)."""
        ...

    def close(self) -> None: ...


@dataclass
class BatchResult:
    results: TokenResults  # per row of the batch
    timings: list[tuple[int, int]]  # per group read on the critical path: its call's start and end (ns)
    draft_hidden: torch.Tensor | None = None  # [rows, hidden]: where a speculative draft's verification starts


Listener = Callable[[int, tuple[int, int]], None]  # hears of a back-fill-only call: its group and timing


@dataclass
class Submitted:
    """A batch in the pipeline: its rows, each reached group's (unread) result, and who hears of its
    back-fill-only calls."""

    rows: Rows
    results: list[Any]
    on_trailing: Listener | None
    start: int = 0  # the first group called (verification of speculative drafts starts past the draft depth)


@dataclass
class _Owed:
    """An output a group owes back-fills for and was not called with, and who hears when it is."""

    output: Any
    listeners: list[Listener]


class Pipeline:
    def __init__(
        self, groups: list[GroupHandle], sync_backfill: bool = False, stats: EngineStats | None = None
    ) -> None:
        for group in groups:
            if getattr(group, "pipeline", None) is not None:
                raise ValueError("a layer group belongs to one pipeline: its calls' order is that pipeline's")
            group.pipeline = self
        self.groups = groups
        self.sync_backfill = sync_backfill
        self.stats = stats or EngineStats()
        # Trailing calls: a step's calls on groups deeper than its rows went, which only back-fill and which
        # nobody waits for; failures are logged.
        self._trailing: set[asyncio.Task] = set()
        # Per group: earlier groups' outputs it owes back-fills for and has not been called with yet.
        self._owed: list[list[Any]] = [[] for _ in groups]
        self._points = torch.tensor(sorted({p for g in groups for p in g.spec.exit_points}), dtype=torch.int64)
        self._ends = torch.tensor([g.spec.end for g in groups], dtype=torch.int64)

    async def execute(self, rows: Rows) -> BatchResult:
        return await self.collect(self.submit(rows))

    def submit(
        self, rows: Rows, on_trailing: Listener | None = None, hidden: torch.Tensor | None = None, depth: int = 0
    ) -> Submitted:
        """Send the batch to every group it can reach (each call takes the previous one's output); deeper
        groups are owed that output. `on_trailing(group, timing)` hears when each call that only
        back-fills this batch's rows finishes. With `hidden`, the rows' hidden states after `depth` layers,
        the batch enters at layer `depth` (speculative drafts, verified)."""
        results = []
        batch: Any = rows
        start = 0
        if hidden is not None:
            start = next(g for g, group in enumerate(self.groups) if group.spec.start <= depth < group.spec.end)
            if depth > self.groups[start].spec.start and self._owed[start]:
                self._call_owed(start)  # what it owes runs the group's first layers, which these rows skip
            batch = Continuing(rows, hidden, SkippedRows.empty(), hidden[:0], depth)
        reach = self._reach(rows)
        for g, group in enumerate(self.groups):
            if g < start:
                continue
            if g > reach:
                self._owed[g].append(_Owed(batch, [on_trailing] if on_trailing else []))
                break
            result_ref, batch = group.forward(batch, [o.output for o in self._take_owed(g)])
            results.append(result_ref)
        for g in range(reach + 1, len(self.groups)):
            if len(self._owed[g]) >= OWED_CALLS:
                self._call_owed(g)
        return Submitted(rows, results, on_trailing, start)

    def _reach(self, rows: Rows) -> int:
        """The deepest group a row of the batch can run in: a row with exit controls stops at the first
        exit point at or past its max_depth (which defaults to the last layer)."""
        if self.sync_backfill or not len(rows) or bool((rows.policy == Policy.NONE).any()):
            return len(self.groups) - 1
        stop = self._points[torch.searchsorted(self._points, rows.max_depth).clamp(max=len(self._points) - 1)]
        stop = torch.where(rows.backfill == Backfill.DRAFT, rows.max_depth, stop)  # drafts end at a group's end
        return int(torch.searchsorted(self._ends, stop.max()))

    def _take_owed(self, g: int) -> list[_Owed]:
        owed, self._owed[g] = self._owed[g], []
        return owed

    def _call_owed(self, g: int) -> None:
        """Call group g with what it is owed (back-fill only); its output is owed to the next group."""
        owed = self._take_owed(g)
        result_ref, out = self.groups[g].forward(owed[-1].output, [o.output for o in owed[:-1]])
        listeners = [listener for o in owed for listener in o.listeners]
        self._trail(g, result_ref, time.monotonic(), listeners)
        if g + 1 < len(self.groups):
            self._owed[g + 1].append(_Owed(out, listeners))

    def settle(self) -> None:
        """Call every group with what it is owed, in group order (so what a call passes on goes along)."""
        for g in range(len(self.groups)):
            if self._owed[g]:
                self._call_owed(g)

    def discard_owed(self) -> None:
        """Forget the owed back-fills (a lost worker: every cache is cleared and rebuilt anyway)."""
        self._owed = [[] for _ in self.groups]

    async def collect(self, submitted: Submitted) -> BatchResult:
        """Read the groups' results in order until every row has exited. The deeper groups' calls only
        back-fill (trailing calls): the batch's `on_trailing` hears when each one finishes."""
        rows, results = submitted.rows, submitted.results
        n = len(rows)
        out = TokenResults.empty(n, max(int(rows.logprobs.max()), 0) if n else 0)
        ids = torch.arange(n)
        timings = []
        g = 0
        draft_hidden = None
        while g < len(results) and (len(ids) or self.sync_backfill):
            result: StepResult = await self.groups[submitted.start + g].fetch(results[g])
            timings.append(result.timing)
            out.put(ids[result.exited], result.results)
            if len(result.drafted):
                if draft_hidden is None:
                    draft_hidden = result.draft_hidden.new_zeros(n, result.draft_hidden.shape[1])
                draft_hidden[ids[result.drafted]] = result.draft_hidden
            keep = torch.ones(len(ids), dtype=torch.bool)
            keep[result.exited] = False
            ids = ids[keep]
            g += 1
        if len(ids):
            raise RuntimeError(f"{len(ids)} rows did not exit by the deepest group they were sent to")
        done_at = time.monotonic()
        listeners = [submitted.on_trailing] if submitted.on_trailing else []
        for rest in range(g, len(results)):  # back-fill only, off the critical path
            self._trail(submitted.start + rest, results[rest], done_at, listeners)
        if g < len(results):
            self.stats.backfill(None, len(self._trailing))
        return BatchResult(out, timings, draft_hidden)

    def _trail(self, g: int, ref: Any, since: float, listeners: list[Listener]) -> None:
        task = asyncio.get_running_loop().create_task(self.groups[g].fetch(ref))
        self._trailing.add(task)
        task.add_done_callback(lambda t: self._trailing_done(t, since, g, listeners))

    def free(self, blocks: list[int]) -> list[tuple[GroupHandle, Any]]:
        """Clear KV blocks on every group. Submitted at once, so it follows the back-fills already sent
        for these blocks and precedes any later call that reuses them; returns what `confirm` awaits."""
        self.settle()  # what is owed to these blocks lands before they are cleared
        freed = torch.tensor(blocks, dtype=torch.int64)
        return [(group, group.free(freed)) for group in self.groups]

    def rollback(self, block_table: torch.Tensor, positions: torch.Tensor) -> list[tuple[GroupHandle, Any]]:
        """Forget the K/V of these positions on every group (rejected drafts), before any later call reads
        them; returns what `confirm` awaits."""
        return [(group, group.rollback(block_table, positions)) for group in self.groups]

    @staticmethod
    async def confirm(calls: list[tuple[GroupHandle, Any]], quiet: bool = False) -> None:
        """Wait for `free` calls; `quiet`: a failure is only logged (a lost worker's cache is gone anyway,
        and recovery clears the others)."""
        try:
            for group, ref in calls:
                await group.fetch(ref)
        except Exception as e:
            if not quiet:
                raise
            log.warning("freeing KV blocks failed: %s", first_line(e))

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block on all the groups together."""
        return sum(group.block_bytes for group in self.groups)

    async def info(self) -> list[dict]:
        return list(await asyncio.gather(*(group.fetch(group.info()) for group in self.groups)))

    def lost_worker(self, error: BaseException) -> bool:
        return any(group.lost(error) for group in self.groups)

    async def ready(self, timeout: float) -> None:
        await asyncio.gather(*(group.ready(timeout) for group in self.groups))

    async def drain(self) -> None:
        """Make the owed back-fill calls and wait for every one in flight (tests and shutdown)."""
        self.settle()
        while self._trailing:
            await asyncio.gather(*self._trailing, return_exceptions=True)

    def close(self) -> None:
        for group in self.groups:
            group.close()

    def _trailing_done(self, task: asyncio.Task, critical_path_done: float, group: int, listeners: list) -> None:
        self._trailing.discard(task)
        self.stats.backfill(time.monotonic() - critical_path_done, len(self._trailing))
        if task.cancelled():
            return
        if task.exception() is not None:
            # The rows' K/V stay missing: the completeness check fails the forward that would read them.
            log.error("a back-fill call failed", exc_info=task.exception())
            return
        for listener in listeners:
            listener(group, task.result().timing)


class LocalGroup:
    """An in-process layer group: one thread of its own, so calls run one at a time in submission order,
    exactly like a synchronous Ray actor, while the event loop stays free."""

    def __init__(self, group: LayerGroup) -> None:
        self.group = group
        self.spec = group.spec
        self.pipeline: Pipeline | None = None
        self.num_blocks = group.cache.num_blocks
        self.block_bytes = group.cache.nbytes // group.cache.num_blocks
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"layer-group-{group.spec.start}")

    def forward(self, batch: Any, owed: list[Any]) -> tuple[Any, Any]:
        future = self._thread.submit(lambda: self.group.forward(_value(batch), [_value(o) for o in owed]))
        return _Part(future, 0), _Part(future, 1)

    def free(self, blocks: torch.Tensor) -> Any:
        return _Part(self._thread.submit(self.group.free, blocks), None)

    def rollback(self, block_table: torch.Tensor, positions: torch.Tensor) -> Any:
        return _Part(self._thread.submit(self.group.rollback, block_table, positions), None)

    def info(self) -> Any:
        return _Part(self._thread.submit(self.group.info), None)

    async def fetch(self, ref: _Part) -> Any:
        value = await asyncio.wrap_future(ref.future)
        return value if ref.index is None else value[ref.index]

    def lost(self, error: BaseException) -> bool:
        return False  # in this process: nothing to lose but the process

    async def ready(self, timeout: float) -> None:
        return None

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
