"""A small causal LM that shares the target's tokenizer drafts a chain autoregressively, batched."""

from __future__ import annotations

import torch

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter, DraftRequest
from cluster.models.backend import HFBackend, Row
from cluster.sampling.acceptance import draft_choice
from cluster.sampling.logits import SamplingTensors, TokenHistory, probs_from_logits


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
        feed = [self._sync(r) for r in batch]
        vocab, device = self.backend.vocab_size, self.backend.device
        params = [r.params for r in batch]
        st = SamplingTensors.from_params(params, vocab, device)  # q is processed exactly as p is
        history = None
        if any(p.penalized for p in params):
            history = TokenHistory([(r.tokens, r.num_prompt) for r in batch], params, vocab, device, self.eos_ids)
        keep_q = [self.rule == "rejection" and not r.params.greedy for r in batch]
        q_rows: list[list[torch.Tensor]] = [[] for _ in batch]
        drafts: list[list[int]] = [[] for _ in batch]
        active = list(range(len(batch)))  # rows still drafting: a row stops at its own budget
        for step in range(max(r.budget for r in batch)):
            logits = self.backend.forward([Row(self._slots[batch[i].seq_id], feed[i]) for i in active],
                                          last_only=True).logits
            for i in active:
                self._seen[batch[i].seq_id].extend(feed[i])
            idx = torch.tensor(active, device=device)
            sub = st.rows(idx)
            adjusted = logits if sub.logit_bias is None else logits + sub.logit_bias
            if history is not None:
                adjusted = history.apply(adjusted, idx)
            q = probs_from_logits(adjusted, sub)
            tokens = torch.tensor([self._sample(q[row], batch[i], step) for row, i in enumerate(active)],
                                  device=device)
            if history is not None:
                history.advance(tokens, idx)
            for row, (i, token) in enumerate(zip(active, tokens.tolist())):
                drafts[i].append(token)
                if keep_q[i]:
                    q_rows[i].append(q[row].float().cpu())
                feed[i] = [token]
            unsure: set[int] = set()
            if self.confidence_threshold > 0:
                confidence = torch.softmax(logits.float(), dim=-1).max(dim=-1).values.tolist()
                unsure = {i for row, i in enumerate(active) if confidence[row] < self.confidence_threshold}
            active = [i for i in active if len(drafts[i]) < batch[i].budget and i not in unsure]
            if not active:
                break
        return [Proposal.chain(d, torch.stack(q_rows[i]) if keep_q[i] else None) for i, d in enumerate(drafts)]

    def _sample(self, q: torch.Tensor, req: DraftRequest, step: int) -> int:
        """Greedy: the argmax. Coupled: the race with the target's noise. Rejection: a draw from q with
        the request's own keyed uniform (independent of the target's)."""
        if req.params.greedy:
            return int(q.argmax())
        return draft_choice(q, req.seed, req.position + step, self.rule)

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
    """The target's weights with every linear layer int8 (dynamic quantization), run by the eager backend."""
    import copy

    from cluster.models.loader import load_model

    source = context.target_model if context.target_model is not None else load_model(context.target, "cpu")
    model = copy.deepcopy(source).float().cpu()
    model.__dict__.pop("_lean_layers", None)  # fused views of the source's weights: not this copy's
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    backend = HFBackend(model, context.num_slots, context.capacity)
    return ModelDrafter(backend, 0.0, context.eos_ids, context.rule)
