"""Where a layer group runs and in what precision, decided in the process that runs it."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU. Decided from torch, not from Ray's GPU ids: a "GPU" that Ray
    hands out may be emulated."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPUs and float32 on CPUs (where bfloat16 matmuls are slow)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
