"""A layer group as a Ray actor: it owns the group's weights (only its own layers) and KV cache.

The actor is synchronous (one call at a time): Ray runs the calls of one submitter, its pipeline replica,
in submission order even when their ObjectRef arguments become ready out of order (the ordering rule in
serving/engine/pipeline.py)."""

from __future__ import annotations

import logging
import os
import time

import ray
import torch
from ray.util import metrics

from workers.device import resolve_device, resolve_dtype
from workers.exit_pack import load_pack
from workers.layer_group import LayerGroup
from workers.model_store import resolve_model
from workers.protocol import Continuing, GroupSpec, Rows, StepResult

log = logging.getLogger(__name__)


class LayerGroupWorker:
    def __init__(
        self,
        model: str,
        spec: GroupSpec,
        exit_pack: str | None,
        device: str,
        dtype: str,
        threads: int | None,
    ) -> None:
        where = resolve_device(device)
        if threads:  # otherwise Ray's choice: the worker's CPU share, at least one
            torch.set_num_threads(threads)
        path = resolve_model(model)
        pack = load_pack(exit_pack, model, path)
        self.group = LayerGroup.load(path, spec, pack, where, resolve_dtype(dtype, where))
        self.spec = spec
        self._tags = {"layers": f"{spec.start}-{spec.end}"}
        self._used = metrics.Gauge("adept_worker_kv_blocks_used", "KV blocks holding K/V on a worker", ("layers",))
        self._free = metrics.Gauge("adept_worker_kv_blocks_free", "KV blocks without K/V on a worker", ("layers",))
        self._report_blocks()
        cache = self.group.cache
        log.info(
            "layer group [%d, %d) ready on %s (pid %d, %d threads), KV cache %d blocks of %d positions (%.0f MiB)",
            spec.start, spec.end, where, os.getpid(), torch.get_num_threads(),
            cache.num_blocks, cache.block_size, cache.nbytes / 2**20,
        )  # fmt: skip

    @ray.method(num_returns=2)
    def forward(self, batch: Rows | Continuing, *owed: Continuing) -> tuple[StepResult, Continuing]:
        """Back-fills owed by earlier calls' outputs and those the batch carries, then its rows: (small
        result, what the next group needs). Tensors leave on the CPU: Ray copies them to host memory anyway."""
        result, out = self.group.forward(batch, list(owed))
        if time.monotonic() - self._reported > 1.0:  # counting blocks reads the whole fill map (a GPU sync)
            self._report_blocks()
        return result, Continuing(out.rows, out.hidden.cpu(), out.skipped, out.skipped_hidden.cpu())

    def free(self, blocks: torch.Tensor) -> None:
        self.group.free(blocks)
        self._report_blocks()

    def rollback(self, block_table: torch.Tensor, positions: torch.Tensor) -> None:
        self.group.rollback(block_table, positions)

    def _report_blocks(self) -> None:
        self._reported = time.monotonic()
        used = len(self.group.cache.occupied())
        self._used.set(used, tags=self._tags)
        self._free.set(self.group.cache.num_blocks - used, tags=self._tags)

    def ping(self) -> tuple[int, int]:
        return self.spec.start, self.spec.end

    def info(self) -> dict:
        return self.group.info() | {"node": ray.get_runtime_context().get_node_id()}
