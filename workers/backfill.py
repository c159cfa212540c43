"""Decoupled and mapped KV back-fill: the K/V of every skipped layer, straight from the exit hidden state.

No skipped layer depends on another, so all of a group's skipped layers and rows are one batched matrix
product over the group's stacked K/V projection weights (ADEPT's decoupled back-fill)."""

from __future__ import annotations

import torch

from workers.layers import apply_rope, rms_norm


def decoupled_kv(
    h_exit: torch.Tensor,
    norm_weight: torch.Tensor,
    kv_weight: torch.Tensor,
    kv_bias: torch.Tensor | None,
    eps: float,
    layer_inputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """K and V (before RoPE) of layers 0..Lk-1 for n rows: [Lk, n, 2 * kv_size].

    h_exit [n, H]; norm_weight [Lk, H] (each layer's input norm); kv_weight [Lk, 2 * kv_size, H];
    layer_inputs [Lk, n, H] replaces h_exit per layer when a learned map predicted each layer's input."""
    if layer_inputs is None:
        x = rms_norm(h_exit, None, eps)[None] * norm_weight[:, None, :]  # the norm of h_exit is shared
    else:
        x = rms_norm(layer_inputs, None, eps) * norm_weight[:, None, :]
    kv = torch.bmm(x, kv_weight.transpose(1, 2))
    return kv if kv_bias is None else kv + kv_bias[:, None, :]


def mapped_inputs(h_exit: torch.Tensor, maps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Each skipped layer's predicted input, maps [Lk, H, H] and bias [Lk, H] -> [Lk, n, H], one bmm."""
    n = h_exit.shape[0]
    return torch.baddbmm(bias[:, None, :], h_exit.expand(maps.shape[0], n, -1), maps.transpose(1, 2))


def split_rope(
    kv: torch.Tensor, num_kv_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[Lk, n, 2 * kv_size] -> k, v [Lk, n, kv_heads, head_dim], RoPE on k at each row's position
    (cos, sin [n, head_dim])."""
    lk, n, _ = kv.shape
    k, v = kv.view(lk, n, 2, num_kv_heads, head_dim).unbind(2)
    return apply_rope(k, cos[None, :, None, :], sin[None, :, None, :]), v
