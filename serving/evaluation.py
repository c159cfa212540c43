"""Quality of early exit against full depth: teacher-forced over a text (every token exits where its policy
says, deeper K/V back-filled, and predicts the next one) and free-running (greedy generations compared)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.engine import Engine
from serving.params import ExitParams, SamplingParams, resolve_exit
from serving.scheduler import Sequence, rows_for


@dataclass
class TeacherForced:
    predictions: torch.Tensor  # int64 [n]: greedy next-token prediction after each token, at its exit
    exit_depths: torch.Tensor  # int64 [n]


async def teacher_forced(
    engine: Engine, token_ids: list[int], exit: ExitParams | dict | None = None, chunk: int = 128
) -> TeacherForced:
    """Feed `token_ids` through the engine's pipeline in prompt chunks, every row sampling greedily at its
    exit. Runs beside the engine's own requests: it holds a KV slot of its own while it runs."""
    if len(token_ids) >= engine.plan.max_model_len:
        raise ValueError(f"{len(token_ids)} tokens do not fit the context of {engine.plan.max_model_len}")
    resolved = resolve_exit(ExitParams.model_validate(exit or {}), engine.config.exit, engine.limits)
    slot = engine.scheduler.slots.allocate()
    if slot is None:
        raise RuntimeError("no free KV slot: run teacher-forced evaluation on an engine with spare capacity")
    seq = Sequence("teacher-forced", list(token_ids), SamplingParams(temperature=0.0), resolved, 0, 1, slot=slot)
    predictions, depths = [], []
    try:
        while not seq.prefill_done:
            n = min(chunk, len(token_ids) - seq.num_computed)
            rows = rows_for([(seq, n)])
            rows.sample[:] = True
            result = await engine.pipeline.execute(rows)
            predictions.append(result.tokens)
            depths.append(result.exit_depth)
            seq.num_computed += n
    finally:
        await engine.pipeline.confirm(engine.pipeline.free([slot]))
        engine.scheduler.slots.free(slot)
    return TeacherForced(torch.cat(predictions), torch.cat(depths))


def agreement(a: torch.Tensor | list[int], b: torch.Tensor | list[int]) -> float:
    """Fraction of positions where two token sequences agree (over the shorter length)."""
    n = min(len(a), len(b))
    if n == 0:
        return 1.0
    return float((torch.as_tensor(a[:n]) == torch.as_tensor(b[:n])).float().mean())


def common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens before two generations first differ."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
