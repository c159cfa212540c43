"""Helpers for driving layer groups and pipelines directly (below the scheduler)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache

from serving.engine.pipeline import LocalGroup, Pipeline
from workers.exit_pack import ExitPack
from workers.kv_cache import blocks_for
from workers.layer_group import LayerGroup
from workers.modes import Backfill, Policy
from workers.protocol import GroupSpec, Rows, TokenResults

BLOCK_SIZE = 16


def load_groups(
    path: Path,
    bounds: list[int],
    exit_points: list[int],
    pack: ExitPack | None = None,
    slots: int = 4,
    max_len: int = 128,
) -> list[LayerGroup]:
    """Groups whose KV pools hold `slots` sequences of `max_len` (see `slot_table`)."""
    blocks = slots * blocks_for(max_len, BLOCK_SIZE)
    specs = [
        GroupSpec(a, b, tuple(p for p in exit_points if a < p <= b), max_len, BLOCK_SIZE, num_blocks=blocks)
        for a, b in itertools.pairwise(bounds)
    ]
    return [LayerGroup.load(path, s, pack) for s in specs]


def slot_table(slot: int, max_len: int = 128) -> list[int]:
    """Below the scheduler, tests give sequence `slot` the blocks [slot * k, (slot + 1) * k) of a pool
    sized by `load_groups`: k blocks hold `max_len` positions."""
    k = blocks_for(max_len, BLOCK_SIZE)
    return list(range(slot * k, (slot + 1) * k))


def pipeline_of(groups: list[LayerGroup], sync_backfill: bool = False) -> Pipeline:
    return Pipeline([LocalGroup(g) for g in groups], sync_backfill)


def rows(
    token_ids,
    positions,
    slot: int | torch.Tensor = 0,
    policy: Policy | torch.Tensor = Policy.NONE,
    max_depth: int | torch.Tensor = 10_000,
    min_depth: int = 1,
    threshold: float = 0.5,
    backfill: Backfill = Backfill.DECOUPLED,
    logprobs: int = -1,
    sample_last: bool = True,
    sample_all: bool = False,
    max_len: int = 128,
    prompt: bool | torch.Tensor = False,
) -> Rows:
    token_ids = torch.as_tensor(token_ids, dtype=torch.int64)
    n = token_ids.numel()

    def full(v, dtype=torch.int64):
        return v.to(dtype) if isinstance(v, torch.Tensor) else torch.full((n,), v, dtype=dtype)

    sample = torch.zeros(n, dtype=torch.bool)
    if sample_all:
        sample[:] = True
    elif sample_last:
        sample[-1] = True
    return Rows(
        block_table=torch.tensor([slot_table(int(s), max_len) for s in full(slot)], dtype=torch.int64),
        positions=torch.as_tensor(positions, dtype=torch.int64),
        token_ids=token_ids,
        policy=full(int(policy) if not isinstance(policy, torch.Tensor) else policy),
        threshold=full(threshold, torch.float32),
        min_depth=full(min_depth),
        max_depth=full(max_depth),
        backfill=full(int(backfill)),
        sample=sample,
        temperature=full(0.0, torch.float32),
        top_p=full(1.0, torch.float32),
        top_k=full(0),
        seed=full(0),
        logprobs=full(logprobs),
        target=full(-1),
        prompt=full(prompt, torch.bool),
    )


def run(pipeline: Pipeline, r: Rows) -> TokenResults:
    """One batch through the pipeline, and every back-fill it sent landed: what each row's exit produced."""

    async def main():
        result = await pipeline.execute(r)
        await pipeline.drain()
        return result.results

    return asyncio.run(main())


def full_logprobs(result: TokenResults, vocab: int) -> torch.Tensor:
    """Rebuild [rows, vocab] log-probabilities from a result that asked for all `vocab` alternatives."""
    return torch.full((result.top_ids.shape[0], vocab), float("-inf")).scatter(1, result.top_ids, result.top_logprobs)


def hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_cache(model, token_ids: torch.Tensor) -> DynamicCache:
    """The full model's KV cache over `token_ids` (one sequence)."""
    with torch.no_grad():
        return model(token_ids[None], use_cache=True).past_key_values


def group_kv(group: LayerGroup, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's cached K, V of global `layer` as [kv_heads, length, head_dim], HF's per-sequence layout."""
    table = torch.tensor([slot_table(slot, group.spec.max_len)])
    k, v = group.cache.gather(layer - group.spec.start, table, length)
    return k[0], v[0]


def weak_late_layers(src: Path, dst: Path, scale: float, first: int) -> Path:
    """A copy of a model whose layers from `first` on add `scale` times what they did (0: nothing, so an
    identity exit at `first` predicts exactly what full depth does)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    weights = load_file(src / "model.safetensors")
    for name in weights:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        if layer >= first and name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = weights[name] * scale
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
