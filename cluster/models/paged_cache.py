"""A paged KV cache: each sequence's positions live in fixed-size blocks taken from one shared pool, so
memory follows actual lengths instead of slots x max_model_len (vLLM's block tables, in miniature).

The slot interface is the slot cache's (allocate, free, truncate, lengths), so workers do not care which
cache a backend uses. Rolling back is still a counter move; blocks past the new length go back to the
pool. The pool's tensors are allocated on first use, in the model's dtype and layout.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, num_slots: int, capacity: int, block_size: int = 16, num_blocks: int | None = None):
        self.num_slots, self.capacity, self.block_size = num_slots, capacity, block_size
        per_slot = -(-capacity // block_size)
        self.num_blocks = num_blocks if num_blocks is not None else num_slots * per_slot
        self.lengths = [0] * num_slots
        self.tables: list[list[int]] = [[] for _ in range(num_slots)]  # block ids per slot, in order
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self.keys: list[torch.Tensor] = []  # per layer: [num_blocks * block_size, kv_heads, head_dim]
        self.values: list[torch.Tensor] = []

    # --- slots ---------------------------------------------------------------------------------
    def allocate(self) -> int:
        if not self._free_slots:
            raise RuntimeError("no free KV cache slot")
        slot = self._free_slots.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free_slots:
            return
        self._release_blocks(slot, 0)
        self.lengths[slot] = 0
        self._free_slots.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free_slots)

    @property
    def occupied(self) -> int:
        return self.num_slots - len(self._free_slots)

    def truncate(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot roll slot {slot} of length {self.lengths[slot]} back to {length}")
        self.lengths[slot] = length
        self._release_blocks(slot, length)

    # --- blocks --------------------------------------------------------------------------------
    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    def bytes_per_block(self) -> int:
        if not self.keys:
            return 0
        per_layer = self.keys[0][: self.block_size].numel() * self.keys[0].element_size()
        return 2 * per_layer * len(self.keys)

    def slot_bytes(self, slot: int) -> int:
        """KV memory a sequence holds now."""
        return len(self.tables[slot]) * self.bytes_per_block()

    def reserve(self, slot: int, length: int) -> None:
        """Make room for positions [0, length) of a slot (before a pass writes them)."""
        if length > self.capacity:
            raise ValueError(f"KV cache overflow: {length} positions > capacity {self.capacity}")
        table = self.tables[slot]
        while len(table) * self.block_size < length:
            if not self._free_blocks:
                raise RuntimeError("KV cache pool exhausted")
            table.append(self._free_blocks.pop())

    def _release_blocks(self, slot: int, length: int) -> None:
        table = self.tables[slot]
        keep = -(-length // self.block_size)
        while len(table) > keep:
            self._free_blocks.append(table.pop())

    def indices(self, slot: int, start: int, end: int) -> torch.Tensor:
        """Flat pool indices of positions [start, end) of a slot."""
        pos = torch.arange(start, end)
        table = torch.tensor(self.tables[slot], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def ensure_layers(self, layers: int, kv_heads: int, head_dim: int, dtype, device) -> None:
        if not self.keys:
            shape = (self.num_blocks * self.block_size, kv_heads, head_dim)
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
