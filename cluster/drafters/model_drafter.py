"""A small causal LM that shares the target's tokenizer drafts k tokens autoregressively, batched."""

from __future__ import annotations

import torch

from cluster.drafters.base import DraftProposal, Drafter, DraftRequest
from cluster.models.runner import ModelRunner
from cluster.sampling.logits import SamplingTensors, TokenHistory, probs_from_logits, sample_from


class ModelDrafter(Drafter):
    name = "model"

    def __init__(self, runner: ModelRunner, confidence_threshold: float = 0.0, eos_ids: tuple[int, ...] = ()):
        self.runner = runner
        # Draft long while the draft is sure, stop at its first unsure token (HF's assistant_confidence_threshold).
        # The length depends only on the draft's own distribution, so the output stays exact.
        self.confidence_threshold = confidence_threshold
        self.eos_ids = tuple(eos_ids)  # held off below min_tokens, as on the target
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
        vocab, device = self.runner.vocab_size, self.runner.device
        params = [r.params for r in batch]
        st = SamplingTensors.from_params(params, vocab, device)  # q is processed exactly as p is
        history = None
        if any(p.penalized for p in params):
            history = TokenHistory([(r.tokens, r.num_prompt) for r in batch], params, vocab, device, self.eos_ids)
        keep_q = [not r.params.greedy for r in batch]
        q_rows: list[list[torch.Tensor]] = [[] for _ in batch]
        drafts: list[list[int]] = [[] for _ in batch]
        active = list(range(len(batch)))  # rows still drafting: a row stops at its own k
        for _ in range(k_max):
            slots = [self._slots[batch[i].seq_id] for i in active]
            logits = self.runner.forward(slots, [feed[i] for i in active], last_only=True)
            for i in active:
                self._seen[batch[i].seq_id].extend(feed[i])
            idx = torch.tensor(active, device=device)
            sub = st.rows(idx)
            adjusted = logits if sub.logit_bias is None else logits + sub.logit_bias
            if history is not None:
                adjusted = history.apply(adjusted, idx)
            q = probs_from_logits(adjusted, sub)
            u = torch.stack([_uniform(batch[i]) for i in active])
            tokens = sample_from(q, u)
            if history is not None:
                history.advance(tokens, idx)
            for row, (i, token) in enumerate(zip(active, tokens.tolist())):
                drafts[i].append(token)
                if keep_q[i]:
                    q_rows[i].append(q[row])
                feed[i] = [token]
            unsure: set[int] = set()
            if self.confidence_threshold > 0:
                confidence = torch.softmax(logits.float(), dim=-1).max(dim=-1).values.tolist()
                unsure = {i for row, i in enumerate(active) if confidence[row] < self.confidence_threshold}
            active = [i for i in active if len(drafts[i]) < batch[i].k and i not in unsure]
            if not active:
                break
        probs = [torch.stack(q_rows[i]).cpu() if keep_q[i] else None for i in range(len(batch))]
        return DraftProposal(drafts, probs if any(keep_q) else [])

    def release(self, seq_id: str) -> None:
        slot = self._slots.pop(seq_id, None)
        self._seen.pop(seq_id, None)
        if slot is not None:
            self.runner.cache.free(slot)


def _uniform(req: DraftRequest) -> torch.Tensor:
    if req.params.greedy:  # q is one-hot: any u gives its argmax; keep the request's RNG untouched
        return torch.zeros(())
    return torch.rand((), generator=req.generator)
