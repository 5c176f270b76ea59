"""A small causal LM that shares the target's tokenizer drafts k tokens autoregressively, batched."""

from __future__ import annotations

import torch

from cluster.drafters.base import DraftProposal, Drafter, DraftRequest
from cluster.models.runner import ModelRunner
from cluster.sampling.logits import process_logits, sample_from


class ModelDrafter(Drafter):
    name = "model"

    def __init__(self, runner: ModelRunner, confidence_threshold: float = 0.0):
        self.runner = runner
        # Draft long while the draft is sure, stop at its first unsure token (HF's assistant_confidence_threshold).
        # The length depends only on the draft's own distribution, so the output stays exact.
        self.confidence_threshold = confidence_threshold
        self._slots: dict[str, int] = {}
        self._seen: dict[str, list[int]] = {}  # tokens whose K/V are in the slot

    @property
    def num_sequences(self) -> int:
        return len(self._slots)

    def _sync(self, req: DraftRequest) -> list[int]:
        """Roll the slot back to the longest prefix still valid; return the tokens it has not seen."""
        if req.seq_id not in self._slots:
            self._slots[req.seq_id] = self.runner.cache.allocate()
            self._seen[req.seq_id] = []
        seen = self._seen[req.seq_id]
        common = 0
        for a, b in zip(seen, req.tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(req.tokens) - 1)  # always feed >= 1 token to get the next distribution
        self.runner.cache.truncate(self._slots[req.seq_id], common)
        del seen[common:]
        return req.tokens[common:]

    @torch.inference_mode()
    def propose(self, batch: list[DraftRequest]) -> DraftProposal:
        feed = [self._sync(r) for r in batch]
        k_max = max(r.k for r in batch)
        temperature = torch.tensor([r.params.temperature for r in batch], dtype=torch.float32)
        top_k = torch.tensor([r.params.top_k for r in batch])
        top_p = torch.tensor([r.params.top_p for r in batch], dtype=torch.float32)
        all_greedy = all(r.params.greedy for r in batch)
        vocab = self.runner.vocab_size
        probs = None if all_greedy else torch.zeros(len(batch), k_max, vocab)
        drafts: list[list[int]] = [[] for _ in batch]
        active = list(range(len(batch)))  # rows still drafting: a row stops at its own k
        for step in range(k_max):
            slots = [self._slots[batch[i].seq_id] for i in active]
            logits = self.runner.forward(slots, [feed[i] for i in active], last_only=True)
            for i in active:
                self._seen[batch[i].seq_id].extend(feed[i])
            idx = torch.tensor(active)
            q = process_logits(logits, temperature[idx], top_k[idx], top_p[idx])
            u = torch.stack([_uniform(batch[i]) for i in active])
            tokens = sample_from(q, u).tolist()
            for row, i in enumerate(active):
                drafts[i].append(tokens[row])
                if probs is not None:
                    probs[i, step] = q[row]
                feed[i] = [tokens[row]]
            unsure: set[int] = set()
            if self.confidence_threshold > 0:
                confidence = torch.softmax(logits.float(), dim=-1).max(dim=-1).values.tolist()
                unsure = {i for row, i in enumerate(active) if confidence[row] < self.confidence_threshold}
            active = [i for i in active if len(drafts[i]) < batch[i].k and i not in unsure]
            if not active:
                break
        return DraftProposal(drafts, probs)

    def release(self, seq_id: str) -> None:
        slot = self._slots.pop(seq_id, None)
        self._seen.pop(seq_id, None)
        if slot is not None:
            self.runner.cache.free(slot)


def _uniform(req: DraftRequest) -> torch.Tensor:
    if req.params.greedy:  # q is one-hot: any u gives its argmax; keep the request's RNG untouched
        return torch.zeros(())
    return torch.rand((), generator=req.generator)
