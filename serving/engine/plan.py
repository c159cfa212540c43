"""The pipeline plan derived from the configuration and the model: how the layers split into groups and
where the exit points are."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from serving.engine.config import DEFAULT_MAX_MODEL_LEN, EngineConfig
from serving.engine.params import ExitLimits
from workers.arch import ModelArch
from workers.kv_cache import blocks_for
from workers.protocol import GroupSpec


@dataclass(frozen=True)
class PipelinePlan:
    num_layers: int
    groups: tuple[GroupSpec, ...]
    exit_points: tuple[int, ...]
    min_exit_depth: int
    max_model_len: int

    def limits(self, has_routers: bool) -> ExitLimits:
        return ExitLimits(self.num_layers, self.min_exit_depth, self.exit_points, has_routers)


def default_exit_points(num_layers: int, min_depth: int) -> list[int]:
    """Every ~num_layers/8 layers from the minimum depth on, plus the last layer (30 layers: 8, 12, ..., 28, 30)."""
    step = max(1, round(num_layers / 8))
    return sorted({d for d in range(step, num_layers, step) if d >= min_depth} | {num_layers})


def plan_pipeline(config: EngineConfig, arch: ModelArch, pack_points: list[int] | None = None) -> PipelinePlan:
    """Groups and exit points: the configured points, else the exit pack's (where it trained heads), else
    the defaults."""
    n = arch.num_layers
    max_len = config.max_model_len or min(DEFAULT_MAX_MODEL_LEN, arch.max_position_embeddings)
    if max_len > arch.max_position_embeddings:
        raise ValueError(f"max_model_len {max_len} exceeds the model's {arch.max_position_embeddings} positions")
    groups = config.num_layer_groups
    if groups > n:
        raise ValueError(f"num_layer_groups {groups} exceeds the model's {n} layers")
    bounds = [0, *(config.layer_boundaries or [round(i * n / groups) for i in range(1, groups)]), n]
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"layer group boundaries {bounds[1:-1]} must increase strictly within (0, {n})")
    min_depth = config.min_exit_depth or max(1, n // 4)
    points = sorted(set(config.exit_points or pack_points or default_exit_points(n, min_depth)) | {n})
    if points[0] < 1 or points[-1] > n:
        raise ValueError(f"exit points must be depths in [1, {n}], got {points}")
    specs = tuple(
        GroupSpec(
            start=a,
            end=b,
            exit_points=tuple(p for p in points if a < p <= b),
            max_len=max_len,
            block_size=config.block_size,
            kv_cache_memory=config.kv_cache_memory,
            kv_cache_fraction=config.kv_cache_fraction,
            max_blocks=config.max_num_seqs * blocks_for(max_len, config.block_size),
            draft_vocab=config.draft_vocab_size,
        )
        for a, b in itertools.pairwise(bounds)
    )
    return PipelinePlan(
        num_layers=n, groups=specs, exit_points=tuple(points), min_exit_depth=min_depth, max_model_len=max_len
    )
