"""Running a batch through the layer groups of one pipeline.

`Pipeline` is shared by the in-process and the distributed engine; they differ only in the GroupHandle:
how a layer group is called and how its answers are fetched. A batch's calls to every group are submitted
at once, each taking the previous one's Continuing (the rows that go on, their hidden states, and the
back-fills owed by this step's early exits), so the batch flows group to group without a round trip
through the pipeline, which reads only the small results. As soon as every row of the batch has exited the
batch is done: the calls still running on deeper groups only back-fill, and nothing waits for them (unless
`sync_backfill`, the slow reference the benchmark compares against).

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

from serving.metrics import EngineStats
from workers.layer_group import LayerGroup
from workers.protocol import Rows, StepResult, TokenResults

log = logging.getLogger(__name__)


class GroupHandle(Protocol):
    """A layer group as the pipeline sees it. Calls to one group take effect in submission order."""

    pipeline: Pipeline | None  # the one pipeline that calls it
    num_blocks: int  # KV blocks in the group's pool
    block_bytes: int  # bytes of one block (K and V of block_size positions of the group's layers)

    def forward(self, batch: Any) -> tuple[Any, Any]: ...

    def free(self, blocks: torch.Tensor) -> Any: ...

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


@dataclass
class Submitted:
    """A batch in the pipeline: its rows and each group's (unread) result."""

    rows: Rows
    results: list[Any]


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

    async def execute(self, rows: Rows) -> BatchResult:
        return await self.collect(self.submit(rows))

    def submit(self, rows: Rows) -> Submitted:
        """Send the batch to every group (each call takes the previous one's output)."""
        results = []
        batch: Any = rows
        for group in self.groups:
            result_ref, batch = group.forward(batch)
            results.append(result_ref)
        return Submitted(rows, results)

    async def collect(
        self, submitted: Submitted, on_trailing: Callable[[int, tuple[int, int]], None] | None = None
    ) -> BatchResult:
        """Read the groups' results in order until every row has exited. The deeper groups' calls only
        back-fill (trailing calls): `on_trailing(group, timing)` hears when each one finishes."""
        rows, results = submitted.rows, submitted.results
        n = len(rows)
        out = TokenResults.empty(n, max(int(rows.logprobs.max()), 0) if n else 0)
        ids = torch.arange(n)
        timings = []
        g = 0
        while g < len(self.groups) and (len(ids) or self.sync_backfill):
            result: StepResult = await self.groups[g].fetch(results[g])
            timings.append(result.timing)
            out.put(ids[result.exited], result.results)
            keep = torch.ones(len(ids), dtype=torch.bool)
            keep[result.exited] = False
            ids = ids[keep]
            g += 1
        done_at = time.monotonic()
        for rest in range(g, len(self.groups)):  # back-fill only, off the critical path
            task = asyncio.get_running_loop().create_task(self.groups[rest].fetch(results[rest]))
            self._trailing.add(task)
            task.add_done_callback(lambda t, at=done_at, g=rest: self._trailing_done(t, at, g, on_trailing))
        if g < len(self.groups):
            self.stats.backfill(None, len(self._trailing))
        return BatchResult(out, timings)

    def free(self, blocks: list[int]) -> list[tuple[GroupHandle, Any]]:
        """Clear KV blocks on every group. Submitted at once, so it follows the back-fills already sent
        for these blocks and precedes any later call that reuses them; returns what `confirm` awaits."""
        freed = torch.tensor(blocks, dtype=torch.int64)
        return [(group, group.free(freed)) for group in self.groups]

    @staticmethod
    async def confirm(calls: list[tuple[GroupHandle, Any]]) -> None:
        for group, ref in calls:
            await group.fetch(ref)

    async def info(self) -> list[dict]:
        return list(await asyncio.gather(*(group.fetch(group.info()) for group in self.groups)))

    def lost_worker(self, error: BaseException) -> bool:
        return any(group.lost(error) for group in self.groups)

    async def ready(self, timeout: float) -> None:
        await asyncio.gather(*(group.ready(timeout) for group in self.groups))

    async def drain(self) -> None:
        """Wait for the back-fill calls in flight (tests and shutdown)."""
        while self._trailing:
            await asyncio.gather(*self._trailing, return_exceptions=True)

    def _trailing_done(
        self, task: asyncio.Task, critical_path_done: float, group: int, on_trailing: Callable | None
    ) -> None:
        self._trailing.discard(task)
        self.stats.backfill(time.monotonic() - critical_path_done, len(self._trailing))
        if task.cancelled():
            return
        if task.exception() is not None:
            # The rows' K/V stay missing: the completeness check fails the forward that would read them.
            log.error("a back-fill call failed", exc_info=task.exception())
        elif on_trailing is not None:
            on_trailing(group, task.result().timing)


class LocalGroup:
    """An in-process layer group: one thread of its own, so calls run one at a time in submission order,
    exactly like a synchronous Ray actor, while the event loop stays free."""

    def __init__(self, group: LayerGroup) -> None:
        self.group = group
        self.pipeline: Pipeline | None = None
        self.num_blocks = group.cache.num_blocks
        self.block_bytes = group.cache.nbytes // group.cache.num_blocks
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"layer-group-{group.spec.start}")

    def forward(self, batch: Any) -> tuple[Any, Any]:
        future = self._thread.submit(lambda: self.group.forward(_value(batch)))
        return _Part(future, 0), _Part(future, 1)

    def free(self, blocks: torch.Tensor) -> Any:
        return _Part(self._thread.submit(self.group.free, blocks), None)

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
