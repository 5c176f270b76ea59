"""A small causal LM that shares the target's tokenizer drafts a chain autoregressively, batched."""

from __future__ import annotations

import torch

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter, DraftRequest
from cluster.drafters.chains import draft_chains
from cluster.models.backend import HFBackend, Row


class ModelDrafter(Drafter):
    name = "model"

    def __init__(self, backend: HFBackend, confidence_threshold: float = 0.0, eos_ids: tuple[int, ...] = (),
                 rule: str = "coupled"):
        self.backend = backend
        # Draft long while the draft is sure, stop at its first unsure token (HF's assistant_confidence_threshold).
        # The length depends only on the draft's own distribution, so the output stays exact.
        self.confidence_threshold = confidence_threshold
        self.eos_ids = tuple(eos_ids)  # held off below min_tokens, as on the target
        self.rule = rule
        self._slots: dict[str, int] = {}
        self._seen: dict[str, list[int]] = {}  # tokens whose K/V are in the slot

    @property
    def num_sequences(self) -> int:
        return len(self._slots)

    def _sync(self, req: DraftRequest) -> list[int]:
        """Roll the slot back to the longest prefix still valid; return the tokens it has not seen."""
        if req.seq_id not in self._slots:
            self._slots[req.seq_id] = self.backend.cache.allocate()
            self._seen[req.seq_id] = []
        seen = self._seen[req.seq_id]
        common = 0
        for a, b in zip(seen, req.tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(req.tokens) - 1)  # always feed >= 1 token to get the next distribution
        self.backend.cache.truncate(self._slots[req.seq_id], common)
        del seen[common:]
        return req.tokens[common:]

    @torch.inference_mode()
    def propose(self, batch: list[DraftRequest]) -> list[Proposal]:
        first = [self._sync(r) for r in batch]

        def next_logits(active: list[int], drafts: list[list[int]]) -> torch.Tensor:
            feed = [first[i] if not drafts[i] else drafts[i][-1:] for i in active]
            logits = self.backend.forward([Row(self._slots[batch[i].seq_id], f) for i, f in zip(active, feed)],
                                          last_only=True).logits
            for i, f in zip(active, feed):
                self._seen[batch[i].seq_id].extend(f)
            return logits

        return draft_chains(batch, [r.budget for r in batch], next_logits, self.backend.vocab_size,
                            self.backend.device, self.eos_ids, self.rule, self.confidence_threshold)

    def release(self, seq_id: str) -> None:
        slot = self._slots.pop(seq_id, None)
        self._seen.pop(seq_id, None)
        if slot is not None:
            self.backend.cache.free(slot)


def build(section, context) -> ModelDrafter:
    from cluster.models.loader import build_backend, load_model

    backend = build_backend(load_model(section, context.device), section, context.num_slots, context.capacity)
    if backend.vocab_size != context.target_vocab:
        raise ValueError(f"drafter.model: vocabulary {backend.vocab_size} != target's {context.target_vocab}")
    if 0 < section.vocab < backend.vocab_size:
        from cluster.models.lean import LeanBackend
        from cluster.models.token_order import frequent_ids

        if not isinstance(backend, LeanBackend):
            raise ValueError(f"drafter.model.vocab: a reduced head needs the lean backend, not {backend.name}")
        ids = frequent_ids(section.path, backend.vocab_size, section.vocab, context.eos_ids)
        backend.restrict_head(ids, backend.head.weight[ids.to(backend.device)].contiguous())
    return ModelDrafter(backend, section.confidence_threshold, context.eos_ids, context.rule)


def build_layerskip(section, context) -> ModelDrafter:
    """The target's first `layers` layers with its final norm and head, as a draft model: in process it
    shares the target's weights; in a draft actor it loads the target's weights itself."""
    from cluster.models.lean import LeanBackend, supports
    from cluster.models.loader import load_model

    model = context.target_model if context.target_model is not None else load_model(context.target, context.device)
    why_not = supports(model)
    if why_not is not None:
        raise ValueError(f"drafter.layerskip: needs a model the lean backend covers ({why_not})")
    backend = LeanBackend(model, context.num_slots, context.capacity, num_layers=section.layers)
    return ModelDrafter(backend, 0.0, context.eos_ids, context.rule)


def build_quantized(section, context) -> ModelDrafter:
    """The target's weights with every linear layer quantized (int8, int4 or fp8). int8 runs on CPU in the
    eager backend; int4 and fp8 on the drafter's device, in the lean backend where it covers the model."""
    from cluster.models.loader import load_model
    from cluster.models.quantized import quantized_backend

    device = "cpu" if section.format == "int8" else context.device
    source = context.target_model
    if source is None or not str(next(source.parameters()).device).startswith(device):
        source = load_model(context.target, device)
    backend = quantized_backend(source, section.format, section.group, context.num_slots, context.capacity)
    return ModelDrafter(backend, section.confidence_threshold, context.eos_ids, context.rule)


def build_sparse(section, context) -> ModelDrafter:
    """The offloaded target in this process, its FFN cut to the neurons its DRAM cache holds (or cast to
    int4 within the same budget)."""
    from cluster.models.offload import SparseDraftBackend

    target = getattr(context.target_model, "_offload", None)
    if target is None:
        raise ValueError("drafter.sparse: needs the target in the same process with `backend: offload` "
                         "(it drafts with that backend's resident weights and its neuron cache)")
    backend = SparseDraftBackend(target, context.num_slots, context.capacity, section.vocab, section.ffn,
                                 section.group)
    return ModelDrafter(backend, section.confidence_threshold, context.eos_ids, context.rule)
