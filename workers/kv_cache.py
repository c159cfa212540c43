"""A layer group's KV cache: a preallocated pool of sequence slots, and the completeness check."""

from __future__ import annotations

import torch


class KVHoleError(RuntimeError):
    """A layer was about to attend to a position whose K/V was never written (a missing back-fill)."""


class SlotAllocator:
    """Which slots of the pool are taken. Lives with the scheduler; workers only index by slot."""

    def __init__(self, num_slots: int) -> None:
        self.capacity = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        self._free.append(slot)


class KVCache:
    """K/V of `num_layers` consecutive layers for `num_slots` sequences of up to `max_len` positions, laid out
    [layer, slot, kv_head, position, head_dim] so that a run of slots is already in attention's layout (a view,
    no copy).

    `filled` records which (layer, slot, position) hold K/V, so attention over a hole fails loudly."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.filled = torch.zeros((num_layers, num_slots, max_len), dtype=torch.bool, device=device)
        self.max_len = max_len
        self.num_slots = num_slots

    def write(self, layers: int | slice, slots: torch.Tensor, positions: torch.Tensor, k, v) -> None:
        """k, v: [n, kv_heads, head_dim] for one layer, or [layers, n, kv_heads, head_dim] for a slice."""
        if positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache length {self.max_len}")
        if isinstance(layers, slice):  # indexing puts the (slot, position) dimension first
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        self.k[layers, slots, :, positions] = k
        self.v[layers, slots, :, positions] = v
        self.filled[layers, slots, positions] = True

    def gather(
        self, layer: int, slots: torch.Tensor, length: int, run: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, length) for `slots` (sorted): [len(slots), kv_heads, length, head_dim].
        `run` = (first, last) when the slots are consecutive: then a view, no copy."""
        if run is not None:
            first, last = run
            return self.k[layer, first : last + 1, :, :length], self.v[layer, first : last + 1, :, :length]
        return self.k[layer, :, :, :length].index_select(0, slots), self.v[layer, :, :, :length].index_select(0, slots)

    def check_complete(self, layer: int, slots: torch.Tensor, needed: torch.Tensor, layer_name: int) -> None:
        """`needed[s, q, t]` marks positions t that query q of slots[s] is about to attend to."""
        length = needed.shape[-1]
        filled = self.filled[layer, slots, :length]
        holes = needed & ~filled[:, None, :]
        if bool(holes.any()):
            s, _, t = (int(i) for i in holes.nonzero()[0])
            raise KVHoleError(
                f"layer {layer_name}: slot {int(slots[s])} has no K/V at position {t}, which a later position "
                "attends to; a back-fill is missing or arrived after the forward that needs it"
            )

    def free(self, slots: torch.Tensor) -> None:
        self.filled[:, slots] = False

    def occupied(self) -> list[int]:
        """Slots that hold any K/V: after every sequence has finished this must be empty."""
        return self.filled.any(dim=2).any(dim=0).nonzero().flatten().tolist()
