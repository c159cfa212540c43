"""What crosses the boundary between the scheduler and a layer group: per-row metadata as tensors
(never Python lists), so the same messages travel in-process and between Ray actors."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class Tensors:
    """A dataclass of tensors that pickles its tensors as NumPy arrays: Ray serializes those without
    copying, while torch's own tensor pickling costs about a millisecond per tensor on every call."""

    def __reduce__(self):
        return _rebuild, (type(self), {f.name: _to_numpy(getattr(self, f.name)) for f in fields(self)})


def _to_numpy(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # NumPy has no bfloat16: travel as its bits
        return ("bfloat16", value.view(torch.int16).numpy())
    return value.numpy()


def _from_numpy(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "bfloat16":
        return _from_numpy(value[1]).view(torch.bfloat16)
    if not isinstance(value, np.ndarray):
        return value
    return torch.from_numpy(value if value.flags.writeable else value.copy())  # Ray's arrays are read-only


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    return cls(**{name: _from_numpy(v) for name, v in values.items()})


def _select(obj, index: torch.Tensor):
    return type(obj)(**{f.name: getattr(obj, f.name)[index] for f in fields(obj)})


def to_device(obj, device: torch.device):
    """A copy of a dataclass of tensors (Rows, SkippedRows, StepResult, ...) on `device`."""

    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) else to_device(v, device) if isinstance(v, Tensors) else v

    return type(obj)(**{f.name: move(getattr(obj, f.name)) for f in fields(obj)})


def _cat(items: list):
    """Row-wise concatenation; [rows, K] fields of different widths are padded with the field's fill (-1
    unless its metadata says otherwise)."""
    cls = type(items[0])
    values = {f.name: pad_cat([getattr(i, f.name) for i in items], f.metadata.get("fill", -1)) for f in fields(cls)}
    return cls(**values)


def pad_cat(parts: list[torch.Tensor], fill: float = -1) -> torch.Tensor:
    """torch.cat along rows; [rows, K] parts of different widths are padded with `fill` first."""
    if parts[0].dim() == 2 and len({p.shape[1] for p in parts}) > 1:
        width = max(p.shape[1] for p in parts)
        parts = [F.pad(p, (0, width - p.shape[1]), value=fill) for p in parts]
    return torch.cat(parts)


@dataclass(frozen=True)
class GroupSpec:
    """Which part of the model a worker holds, and how its KV cache is sized (see workers/kv_cache.py)."""

    start: int
    end: int
    exit_points: tuple[int, ...]  # depths in (start, end]
    max_len: int  # positions per sequence
    block_size: int = 16  # positions per KV block
    kv_cache_memory: int | None = None  # bytes of K/V for the whole pipeline (every layer)
    kv_cache_fraction: float = 0.9  # on a GPU without kv_cache_memory: share of the memory left after weights
    max_blocks: int | None = None  # never more than this (what the pipeline's sequences could fill)
    num_blocks: int | None = None  # exactly this many blocks (tests); overrides the three above
    draft_vocab: int | None = None  # speculative drafts choose among the first this many token ids (None: all)


@dataclass
class Rows(Tensors):
    """Rows of a forward call: tokens of many sequences, each at its own position. 1-D tensors, one length."""

    block_table: torch.Tensor  # int64 [rows, W]: the KV blocks of the row's sequence, in order; -1 pads
    positions: torch.Tensor  # int64
    token_ids: torch.Tensor  # int64: read by the group that holds the embeddings
    policy: torch.Tensor  # int64 (Policy)
    threshold: torch.Tensor  # float32
    min_depth: torch.Tensor  # int64: no exit before this many layers
    max_depth: torch.Tensor  # int64: exit at the first exit point at or past this depth
    backfill: torch.Tensor  # int64 (Backfill)
    sample: torch.Tensor  # bool: the row produces the sequence's next token
    temperature: torch.Tensor  # float32; 0 is greedy
    top_p: torch.Tensor  # float32
    top_k: torch.Tensor  # int64; 0 is off
    seed: torch.Tensor  # int64
    logprobs: torch.Tensor  # int64: -1 none, 0 the chosen token's, k also the top k alternatives
    target: torch.Tensor  # int64: a token whose log-probability the row reports at its exit (scoring); -1 none
    prompt: torch.Tensor  # bool: a prompt position (the pack's prompt heads and routers decide its exit)

    def __len__(self) -> int:
        return self.positions.numel()

    def select(self, index: torch.Tensor) -> Rows:
        return _select(self, index)

    @staticmethod
    def cat(items: list[Rows]) -> Rows:
        return _cat(items)

    @staticmethod
    def empty() -> Rows:
        values = {f.name: torch.empty(0, dtype=_ROW_DTYPES.get(f.name, torch.int64)) for f in fields(Rows)}
        return Rows(**{**values, "block_table": torch.empty(0, 0, dtype=torch.int64)})


_ROW_DTYPES = {"threshold": torch.float32, "temperature": torch.float32, "top_p": torch.float32, "sample": torch.bool,
               "prompt": torch.bool}  # fmt: skip


def sequence_keys(block_table: torch.Tensor) -> torch.Tensor:
    """One key per row, equal for the rows of one sequence: its first block (a block has one owner)."""
    return block_table[:, 0]


@dataclass
class SkippedRows(Tensors):
    """Tokens that exited before this group's layers, whose K/V this group still owes (how it fills them is
    each row's back-fill mode); `index` picks each row's exit hidden state from the tensor that travels
    beside this metadata."""

    block_table: torch.Tensor  # int64 [rows, W], as in Rows
    positions: torch.Tensor  # int64
    exit_layer: torch.Tensor  # int64
    backfill: torch.Tensor  # int64 (Backfill)
    index: torch.Tensor  # int64: row of the accompanying hidden-state tensor

    def __len__(self) -> int:
        return self.positions.numel()

    def select(self, index: torch.Tensor) -> SkippedRows:
        return _select(self, index)

    @staticmethod
    def cat(items: list[SkippedRows]) -> SkippedRows:
        return _cat(items)

    @staticmethod
    def empty() -> SkippedRows:
        e = torch.empty(0, dtype=torch.int64)
        return SkippedRows(torch.empty(0, 0, dtype=torch.int64), e, e, e, e)


@dataclass
class Continuing(Tensors):
    """What one group hands the next within a step: the rows that did not exit, with their hidden states,
    and the back-fills deeper groups owe this step's early exits (decoupled/mapped: every deeper group,
    from the exit hidden state; exact: the next group, from this group's output). It travels worker to
    worker (an ObjectRef between actors), never through the pipeline replica."""

    rows: Rows
    hidden: torch.Tensor
    skipped: SkippedRows
    skipped_hidden: torch.Tensor  # row i of `skipped` back-fills from skipped_hidden[skipped.index[i]]
    depth: int = 0  # the layer `hidden` comes out of, where the rows enter past the group's start (verification)

    @staticmethod
    def merge(owed: list[Continuing], batch: Continuing) -> Continuing:
        """`batch` with the back-fills of earlier outputs (no rows: back-fill only) in front of its own."""
        if any(len(o.rows) for o in owed):
            raise ValueError("an owed output carries rows: only back-fill-only outputs are held back")
        parts, offset, skipped = [*owed, batch], 0, []
        for part in parts:
            skipped.append(dataclasses.replace(part.skipped, index=part.skipped.index + offset))
            offset += part.skipped_hidden.shape[0]
        hidden = torch.cat([p.skipped_hidden for p in parts])
        return Continuing(batch.rows, batch.hidden, SkippedRows.cat(skipped), hidden, batch.depth)


def _fill(dtype: torch.dtype, value: float, per_alternative: bool = False) -> dict[str, Any]:
    """A per-row field's metadata: its dtype, its value where a row has none, whether it is [rows, K]."""
    return {"dtype": dtype, "fill": value, "per_alternative": per_alternative}


@dataclass
class TokenResults(Tensors):
    """What each row's exit produced: one row per token, from the worker that exits it to the stream that
    delivers it. A per-token output is one field here (its dtype and its value where a row has none)."""

    # layers the row ran; 0: it has not exited
    exit_layer: torch.Tensor = field(metadata=_fill(torch.int64, 0))
    # the sampled token; -1 where the row does not sample
    tokens: torch.Tensor = field(metadata=_fill(torch.int64, -1))
    # the sampled token's log-probability; NaN where not asked for
    logprobs: torch.Tensor = field(metadata=_fill(torch.float32, math.nan))
    # [rows, K]: the best alternatives (K the most any row asked for), -1 / -inf pads
    top_ids: torch.Tensor = field(metadata=_fill(torch.int64, -1, True))
    top_logprobs: torch.Tensor = field(metadata=_fill(torch.float32, -math.inf, True))
    # the log-probability of the row's target token (scoring); NaN where none
    target_logprobs: torch.Tensor = field(metadata=_fill(torch.float32, math.nan))

    def __len__(self) -> int:
        return self.exit_layer.numel()

    @staticmethod
    def empty(n: int, top_k: int, device: torch.device | str = "cpu") -> TokenResults:
        """`n` rows holding every field's fill value; K = `top_k` alternatives per row."""
        values = {}
        for f in fields(TokenResults):
            meta = f.metadata
            shape = (n, top_k) if meta["per_alternative"] else (n,)
            values[f.name] = torch.full(shape, meta["fill"], dtype=meta["dtype"], device=device)
        return TokenResults(**values)

    def select(self, index: torch.Tensor | slice) -> TokenResults:
        return _select(self, index)

    @staticmethod
    def cat(items: list[TokenResults]) -> TokenResults:
        return _cat(items)

    def put(self, index: torch.Tensor, values: TokenResults) -> None:
        """Rows `index` of this take `values`' rows, in place. `values` may have fewer alternatives per row
        (a group's K is the most its own rows asked for); the rest keep their fill."""
        for f in fields(self):
            target, value = getattr(self, f.name), getattr(values, f.name)
            if f.metadata["per_alternative"]:
                target[index, : value.shape[1]] = value
            else:
                target[index] = value


@dataclass
class StepResult(Tensors):
    """The small part of a group's answer, which the pipeline reads; hidden states travel separately (by
    reference between actors)."""

    exited: torch.Tensor  # int64: indices into the call's rows
    results: TokenResults  # per exited row
    timing: tuple[int, int] = (0, 0)  # wall clock (ns) when the call started and ended, for traces
    # Speculative drafts that exited here (Backfill.DRAFT): indices into the call's rows, and their hidden
    # states, where their verification continues (small: one vector per drafted token).
    drafted: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    draft_hidden: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))
