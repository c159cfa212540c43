"""The pieces of a Llama-family decoder layer as plain functions on HF weights (RMSNorm, RoPE, attention
over a batch of rows from many sequences)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.protocol import sequence_keys


def rms_norm(h: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """As HF's LlamaRMSNorm: normalize in float32, scale in the model dtype."""
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return normed if weight is None else weight * normed


def head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for an LM head (weight [vocab, hidden]). On the CPU, for the few rows of a decode or
    verification step, as weight @ x.T over at least two rows: MKL runs that as a multi-threaded GEMM that
    reads the head several times faster than F.linear's path for 1 to 8 rows (one thread, row by row):
    on this project's 2-core machines the default model's head takes 3.7 ms instead of 7.6 for one row and
    4.6 instead of 11.9 for five (benchmarks/head_speed.py, docs/performance.md)."""
    n = x.shape[0]
    if x.device.type != "cpu" or not 0 < n <= 8:
        return F.linear(x, weight)
    rows = x if n > 1 else torch.cat([x, x.new_zeros(1, x.shape[1])])
    return (weight @ rows.T).T[:n].contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim]; cos, sin broadcastable to [..., 1, head_dim] (HF's rotate_half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class AttentionLayout:
    """How P rows (from S sequences) are laid out for batched attention: queries padded to [S, Qmax],
    keys are positions [0, T) of each sequence, read from its KV blocks. Built once per set of rows, reused
    by every layer."""

    tables: torch.Tensor  # [S, nb] each sequence's KV blocks covering [0, T) (-1 pads)
    query_index: torch.Tensor  # [S, Qmax] row of each padded query (padding points at row 0)
    row_index: torch.Tensor  # [P] position of each row in the flattened [S * Qmax] queries
    query_pos: torch.Tensor  # [S, Qmax] (padding: 0)
    valid: torch.Tensor  # [S, Qmax]
    cos: torch.Tensor  # [P, 1, head_dim]
    sin: torch.Tensor
    length: int  # T
    _masks: dict

    @classmethod
    def build(
        cls, block_table: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_size: int
    ) -> AttentionLayout:
        n = positions.numel()
        device = positions.device
        unique, inverse = torch.unique(sequence_keys(block_table), return_inverse=True)
        counts = torch.bincount(inverse, minlength=unique.numel())
        q_max = int(counts.max())
        order = torch.argsort(inverse, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[inverse[order]]
        row_index = inverse * q_max + rank
        flat = unique.numel() * q_max
        query_index = torch.zeros(flat, dtype=torch.int64, device=device)
        query_index[row_index] = torch.arange(n, device=device)
        query_pos = torch.zeros(flat, dtype=torch.int64, device=device)
        query_pos[row_index] = positions
        valid = torch.zeros(flat, dtype=torch.bool, device=device)
        valid[row_index] = True
        shape = (unique.numel(), q_max)
        length = int(positions.max()) + 1
        first_row = query_index.view(shape)[:, 0]  # rank 0 of each sequence is a real row
        tables = block_table[first_row, : -(-length // block_size)]
        return cls(
            tables=tables,
            query_index=query_index.view(shape),
            row_index=row_index,
            query_pos=query_pos.view(shape),
            valid=valid.view(shape),
            cos=cos[positions][:, None, :],
            sin=sin[positions][:, None, :],
            length=length,
            _masks={},
        )

    def masks(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask [S, Qmax, T], positions each real query needs [S, Qmax, T]) for a layer."""
        if window not in self._masks:
            key_pos = torch.arange(self.length, device=self.query_pos.device)
            allowed = key_pos <= self.query_pos[..., None]
            if window is not None:
                allowed &= key_pos > self.query_pos[..., None] - window
            self._masks[window] = (allowed, allowed & self.valid[..., None])
        return self._masks[window]
