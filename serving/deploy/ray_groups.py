"""Layer groups as Ray actors: the distributed engine's GroupHandle.

The pipeline replica that calls `ray_groups` runs in a placement group that Serve created for it (one bundle
for the replica, then one per layer group); each worker goes into its own bundle, so one pipeline's workers
are scheduled, and torn down, together. Hidden states stay ObjectRefs: they move worker to worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serving.engine.config import EngineConfig
from serving.engine.pipeline import Pipeline
from serving.engine.plan import PipelinePlan
from workers.actor import LayerGroupWorker
from workers.protocol import GroupSpec


class RayGroup:
    """A layer-group actor. Its pipeline replica is its only caller, so Ray runs its calls in submission order."""

    def __init__(self, actor: ray.actor.ActorHandle, spec: GroupSpec, info: dict) -> None:
        self.actor, self.spec = actor, spec
        self.pipeline: Pipeline | None = None
        self.num_blocks = info["num_blocks"]
        self.block_bytes = info["kv_cache_bytes"] // info["num_blocks"]

    def forward(self, batch: Any, owed: list[Any]) -> tuple[Any, Any]:
        return self.actor.forward.remote(batch, *owed)

    def free(self, blocks: torch.Tensor) -> Any:
        return self.actor.free.remote(blocks)

    def rollback(self, block_table: torch.Tensor, positions: torch.Tensor) -> Any:
        return self.actor.rollback.remote(block_table, positions)

    def info(self) -> Any:
        return self.actor.info.remote()

    async def fetch(self, ref: ray.ObjectRef) -> Any:
        return await ref

    def lost(self, error: BaseException) -> bool:
        """A worker process that died fails its calls (RayActorError) and the hidden states it owned
        (ObjectLostError), possibly wrapped in the error of a later call that depended on them."""
        for _ in range(8):
            if isinstance(error, RayActorError | ObjectLostError):
                return True
            cause = error.cause if isinstance(error, RayTaskError) else error.__cause__
            if cause is None:
                return False
            error = cause
        return False

    async def ready(self, timeout: float) -> None:
        """Ray restarts a dead worker (max_restarts) with its layers and an empty cache; wait for it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await asyncio.wait_for(self.actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except (RayActorError, TimeoutError):
                if time.monotonic() > deadline or self._dead():
                    raise
                await asyncio.sleep(0.2)

    def _dead(self) -> bool:
        """Dead for good: its restarts are used up (Ray's actor table says DEAD, not RESTARTING)."""
        from ray._private.state import state  # the GCS's actor table: works without the dashboard

        info = state.actor_table(self.actor._actor_id.hex())
        return bool(info) and info.get("State") == "DEAD"

    def close(self) -> None:
        ray.kill(self.actor)


def ray_groups(
    config: EngineConfig,
    plan: PipelinePlan,
    resources: dict[str, float],
    threads: int | None,
    name: Callable[[int], str],
    max_restarts: int,
    first_bundle: int = 1,
) -> list[RayGroup]:
    """Start one worker per layer group (in bundles first_bundle, first_bundle + 1, ... of the current
    placement group, if there is one), named `name(i)`, and wait until every one has loaded its
    layers."""
    placement = get_current_placement_group()
    resources = dict(resources)
    cpus, gpus = resources.pop("CPU", 0.0), resources.pop("GPU", 0.0)
    actor_class = ray.remote(LayerGroupWorker)
    actors = []
    for i, spec in enumerate(plan.groups):
        strategy = (
            PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=first_bundle + i)
            if placement is not None
            else None
        )
        actors.append(
            actor_class.options(
                num_cpus=cpus,
                num_gpus=gpus,
                resources=resources,
                scheduling_strategy=strategy,
                name=name(i),
                max_restarts=max_restarts,  # a restarted worker has an empty cache: the engine rebuilds it
            ).remote(config.model, spec, config.exit_pack, config.device, config.dtype, threads)
        )
    infos = ray.get([a.info.remote() for a in actors])  # raises here if a worker cannot load its layers
    return [RayGroup(a, spec, info) for a, spec, info in zip(actors, plan.groups, infos, strict=True)]
