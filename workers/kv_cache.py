"""KV memory in pages, as vLLM's PagedAttention: each layer group's cache is a pool of fixed-size blocks
(`block_size` positions of every layer of the group). The scheduler owns the allocation (`BlockPool`) and
each sequence's block table; workers index their caches by the tables that travel with the rows.

Block ids mean the same on every group of a pipeline: block b of group 1 and block b of group 2 hold the
same positions of the same sequence at different layers. `filled` records which positions hold K/V, so
attention over a hole (a missing back-fill) fails loudly, across block boundaries like anywhere else."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # types only: the scheduler imports this module
    from workers.arch import ModelArch
    from workers.protocol import GroupSpec

# The pipeline's K/V budget on a CPU when `kv_cache_memory` is not given.
DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30


class KVHoleError(RuntimeError):
    """A layer was about to attend to a position whose K/V was never written (a missing back-fill)."""


def blocks_for(positions: int, block_size: int) -> int:
    return math.ceil(positions / block_size)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> int:
    """K and V of one position over `num_layers` layers."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


class BlockPool:
    """Which blocks are taken. Lives with the scheduler; workers only index by block."""

    def __init__(self, num_blocks: int) -> None:
        self.capacity = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"{n} KV blocks asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    """K/V of `num_layers` consecutive layers in `num_blocks` blocks of `block_size` positions, laid out
    [layer, kv_head, block, position in block, head_dim]: gathering a batch's blocks is one index_select per
    layer, whose result is already attention's [sequence, kv_head, position, head_dim] up to a transpose."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.filled = torch.zeros((num_layers, num_blocks, block_size), dtype=torch.bool, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def locate(self, block_table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset in block) of each row's position: where `write` puts its K/V. Computed once per set
        of rows, for all the layers that write them."""
        column = positions // self.block_size
        if column.numel() and int(column.max()) >= block_table.shape[1]:
            raise ValueError(f"position {int(positions.max())} is past its sequence's KV blocks")
        blocks = block_table.gather(1, column[:, None]).squeeze(1)
        if blocks.numel() and int(blocks.min()) < 0:
            raise ValueError("a position has no KV block: the block table does not cover it")
        return blocks, positions % self.block_size

    def write(self, layers: int | slice, at: tuple[torch.Tensor, torch.Tensor], k, v) -> None:
        """K/V of n rows at `at` (from `locate`): k, v [n, kv_heads, head_dim] for one layer, or
        [layers, n, kv_heads, head_dim] for a slice."""
        blocks, offsets = at
        # Indexing [layers, :, blocks, offsets] yields [(layers,) kv_heads, n, head_dim].
        k, v = k.transpose(-3, -2), v.transpose(-3, -2)
        self.k[layers, :, blocks, offsets] = k
        self.v[layers, :, blocks, offsets] = v
        self.filled[layers, blocks, offsets] = True

    def gather(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, length) of each sequence whose blocks are a row of `tables` [S, nb]
        (-1 pads where a sequence has fewer blocks; its positions there are masked): [S, kv_heads, length,
        head_dim]."""
        s, nb = tables.shape
        flat = tables.clamp(min=0).flatten()

        def read(cache: torch.Tensor) -> torch.Tensor:
            picked = cache[layer].index_select(1, flat)  # [kv_heads, S * nb, block_size, head_dim]
            heads, _, size, dim = picked.shape
            return picked.view(heads, s, nb * size, dim)[:, :, :length].transpose(0, 1)

        return read(self.k), read(self.v)

    def check_complete(self, layer: int, tables: torch.Tensor, needed: torch.Tensor, layer_name: int) -> None:
        """`needed[s, q, t]` marks positions t that query q of the sequence tables[s] is about to attend to."""
        length = needed.shape[-1]
        filled = self.filled[layer].index_select(0, tables.clamp(min=0).flatten())
        filled = filled.view(tables.shape[0], -1)[:, :length]
        holes = needed & ~filled[:, None, :]
        if bool(holes.any()):
            s, _, t = (int(i) for i in holes.nonzero()[0])
            raise KVHoleError(
                f"layer {layer_name}: the sequence in KV block {int(tables[s, 0])} has no K/V at position {t}, "
                "which a later position attends to; a back-fill is missing or arrived after the forward that "
                "needs it"
            )

    def free(self, blocks: torch.Tensor) -> None:
        self.filled[:, blocks] = False

    def clear(self, at: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Forget the K/V of single positions (from `locate`) in every layer: a rejected speculative draft."""
        blocks, offsets = at
        self.filled[:, blocks, offsets] = False

    def occupied(self) -> list[int]:
        """Blocks that hold any K/V: after every sequence has finished this must be empty."""
        return self.filled.any(dim=2).any(dim=0).nonzero().flatten().tolist()


def pool_size(spec: GroupSpec, arch: ModelArch, dtype: torch.dtype, device: torch.device) -> int:
    """Blocks of one group's pool: `spec.num_blocks` if set. With `kv_cache_memory` (bytes for the whole
    pipeline): what it buys for every layer of the model, the same count on every group. Without it: on a
    GPU, `kv_cache_fraction` of the memory still free there (after this group's weights) for this group's
    layers; on a CPU, the default budget. Never more than `max_blocks`."""
    if spec.num_blocks:
        return spec.num_blocks

    def per_block(layers: int) -> int:
        return spec.block_size * kv_bytes_per_token(layers, arch.num_kv_heads, arch.head_dim, dtype)

    if spec.kv_cache_memory is None and device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        blocks = int(free * spec.kv_cache_fraction) // per_block(spec.end - spec.start)
    else:
        budget = DEFAULT_CPU_KV_CACHE_MEMORY if spec.kv_cache_memory is None else spec.kv_cache_memory
        blocks = budget // per_block(arch.num_layers)
    return blocks if spec.max_blocks is None else min(blocks, spec.max_blocks)
