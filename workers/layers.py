"""The pieces of a Llama-family decoder layer as plain functions on HF weights (RMSNorm, RoPE, attention
over a batch of rows from many sequences)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rms_norm(h: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """As HF's LlamaRMSNorm: normalize in float32, scale in the model dtype."""
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return normed if weight is None else weight * normed


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim]; cos, sin broadcastable to [..., 1, head_dim] (HF's rotate_half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class AttentionLayout:
    """How P rows (from S sequences) are laid out for batched attention: queries padded to [S, Qmax],
    keys are positions [0, T) of each sequence's slot. Built once per set of rows, reused by every layer."""

    slots: torch.Tensor  # [S] the distinct slots
    query_index: torch.Tensor  # [S, Qmax] row of each padded query (padding points at row 0)
    row_index: torch.Tensor  # [P] position of each row in the flattened [S * Qmax] queries
    query_pos: torch.Tensor  # [S, Qmax] (padding: 0)
    valid: torch.Tensor  # [S, Qmax]
    cos: torch.Tensor  # [P, 1, head_dim]
    sin: torch.Tensor
    length: int  # T
    run: tuple[int, int] | None  # (first, last) slot when the slots are consecutive: the cache is read as a view
    _masks: dict

    @classmethod
    def build(cls, slots: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        n = slots.numel()
        unique, inverse = torch.unique(slots, return_inverse=True)
        counts = torch.bincount(inverse, minlength=unique.numel())
        q_max = int(counts.max())
        order = torch.argsort(inverse, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=slots.device) - (torch.cumsum(counts, 0) - counts)[inverse[order]]
        row_index = inverse * q_max + rank
        flat = unique.numel() * q_max
        query_index = torch.zeros(flat, dtype=torch.int64, device=slots.device)
        query_index[row_index] = torch.arange(n, device=slots.device)
        query_pos = torch.zeros(flat, dtype=torch.int64, device=slots.device)
        query_pos[row_index] = positions
        valid = torch.zeros(flat, dtype=torch.bool, device=slots.device)
        valid[row_index] = True
        shape = (unique.numel(), q_max)
        return cls(
            slots=unique,
            query_index=query_index.view(shape),
            row_index=row_index,
            query_pos=query_pos.view(shape),
            valid=valid.view(shape),
            cos=cos[positions][:, None, :],
            sin=sin[positions][:, None, :],
            length=int(positions.max()) + 1,
            run=(first, last) if (last := int(unique[-1])) - (first := int(unique[0])) + 1 == unique.numel() else None,
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
