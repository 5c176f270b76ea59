"""A slot-based KV cache: each sequence owns a slot; its K/V are written in place at its own positions.

Rolling back is lowering the slot's length (a counter, not a copy): rejected positions are simply
overwritten by the next write. Buffers are allocated on first use from the shapes the model produces,
so any attention layout (MHA, GQA, head_dim) works without reading the model's config.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotKVCache:
    def __init__(self, num_slots: int, capacity: int):
        self.num_slots = num_slots
        self.capacity = capacity  # positions per slot
        self.lengths = [0] * num_slots  # valid positions per slot
        self._free = list(range(num_slots - 1, -1, -1))
        self.keys: list[torch.Tensor] = []  # per layer: [slots, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []

    # --- slot bookkeeping -------------------------------------------------------------------
    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV cache slot")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            return
        self.lengths[slot] = 0
        self._free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def occupied(self) -> int:
        return self.num_slots - len(self._free)

    def truncate(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot roll slot {slot} of length {self.lengths[slot]} back to {length}")
        self.lengths[slot] = length

    def reserve(self, slot: int, length: int) -> None:
        """Room for positions [0, length): a slot always has its whole capacity."""
        if length > self.capacity:
            raise ValueError(f"KV cache overflow: {length} positions > capacity {self.capacity}")

    def slot_bytes(self, slot: int) -> int:
        """KV memory a sequence holds: its whole slot, whatever its length."""
        if not self.keys:
            return 0
        per_layer = self.keys[0][0].numel() * self.keys[0].element_size()
        return 2 * per_layer * len(self.keys)

    # --- the view a model forward writes through --------------------------------------------
    def batch_view(self, slots: list[int], num_new: int) -> _BatchView:
        starts = [self.lengths[s] for s in slots]
        span = max(starts) + num_new
        if span > self.capacity:
            raise ValueError(f"KV cache overflow: {span} positions > capacity {self.capacity}")
        return _BatchView(self, slots, starts, num_new, span)


class _BatchView(Cache):
    """What the HF model sees for one forward: writes go to each sequence's slot at its own offset."""

    def __init__(self, store: SlotKVCache, slots: list[int], starts: list[int], num_new: int, span: int):
        super().__init__(layers=[])
        self.store, self.span, self.starts = store, span, starts
        self.slot_index = torch.tensor(slots).unsqueeze(-1)  # [B, 1]
        self.write_pos = torch.tensor(starts).unsqueeze(-1) + torch.arange(num_new)  # [B, T]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self._rows = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        store = self.store
        if layer_idx == len(store.keys):  # lazy allocation, in the model's own dtype and layout
            _, heads, _, dim = key_states.shape
            shape = (store.num_slots, heads, store.capacity, dim)
            store.keys.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
            store.values.append(torch.zeros(shape, dtype=value_states.dtype, device=value_states.device))
        k_buf, v_buf = store.keys[layer_idx], store.values[layer_idx]
        # Advanced indices around a slice put [B, T] first: the write takes [B, T, heads, dim].
        k_buf[self.slot_index, :, self.write_pos] = key_states.transpose(1, 2)
        v_buf[self.slot_index, :, self.write_pos] = value_states.transpose(1, 2)
        return k_buf[self._rows, :, : self.span], v_buf[self._rows, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.span
