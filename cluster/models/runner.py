"""One batched forward of a causal LM over ragged sequences, each extending its own cache slot."""

from __future__ import annotations

import torch

from cluster.models.kv_cache import SlotKVCache


class ModelRunner:
    """A model and its KV cache. `forward` appends each row's new tokens to its slot and returns logits.

    Rows may carry different numbers of new tokens (prefill of different prompts, verify of different
    draft lengths): they are right-padded to the longest, the pads are masked out of attention and
    their cache writes land past the slot's length, where the next real write overwrites them.
    """

    def __init__(self, model: torch.nn.Module, num_slots: int, capacity: int):
        self.model = model
        self.base = model.base_model  # the transformer without its LM head
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.cache = SlotKVCache(num_slots, capacity)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    @torch.inference_mode()
    def forward(self, slots: list[int], tokens: list[list[int]], last_only: bool = False) -> torch.Tensor:
        """Returns float32 logits [B, T_max, V], or [B, V] at each row's last new token if last_only."""
        lengths = [len(t) for t in tokens]
        if min(lengths) < 1:
            raise ValueError("every row needs at least one new token")
        width = max(lengths)
        ids = torch.zeros(len(tokens), width, dtype=torch.long)
        for row, toks in enumerate(tokens):
            ids[row, : len(toks)] = torch.tensor(toks)
        view = self.cache.batch_view(slots, width)
        positions = view.write_pos  # [B, T]: each row continues from its own length
        key_pos = torch.arange(view.span)
        allowed = key_pos.view(1, 1, -1) <= positions.unsqueeze(-1)  # causal, per row
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        hidden = self.base(
            input_ids=ids.to(self.device),
            attention_mask=mask.unsqueeze(1).to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=view,
            use_cache=True,
        ).last_hidden_state
        for slot, n in zip(slots, lengths):
            self.cache.lengths[slot] += n
        if last_only:
            hidden = hidden[torch.arange(len(tokens)), torch.tensor(lengths) - 1]
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
