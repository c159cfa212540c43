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


def mapped_inputs(h_exit: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Each skipped layer's predicted input h + up(down(h)) + bias, batched over layers: down [Lk, r, H],
    up [Lk, H, r], bias [Lk, H] -> [Lk, n, H]. Low rank keeps it a small fraction of the K/V cost."""
    h = h_exit.expand(down.shape[0], *h_exit.shape)
    return torch.baddbmm(h + bias[:, None, :], torch.bmm(h, down.transpose(1, 2)), up.transpose(1, 2))


def split_rope(
    kv: torch.Tensor, num_kv_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[Lk, n, 2 * kv_size] -> k, v [Lk, n, kv_heads, head_dim], RoPE on k at each row's position
    (cos, sin [n, head_dim])."""
    lk, n, _ = kv.shape
    k, v = kv.view(lk, n, 2, num_kv_heads, head_dim).unbind(2)
    return apply_rope(k, cos[None, :, None, :], sin[None, :, None, :]), v
