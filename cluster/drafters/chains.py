"""Drafting chains autoregressively, batched, with q processed exactly as the target processes p.

Shared by the drafters that run a model one position at a time (a small LM, a compressed copy of the
target, MEGABYTE's local model): they differ only in how they get the next position's logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.core.messages import Proposal, SparseQ
from cluster.drafters.base import DraftRequest
from cluster.sampling.acceptance import draft_choices
from cluster.sampling.logits import SamplingTensors, TokenHistory, probs_from_logits


def draft_chains(batch: list[DraftRequest], budgets: list[int],
                 next_logits: Callable[[list[int], list[list[int]]], torch.Tensor], vocab: int, device,
                 eos_ids: tuple[int, ...] = (), rule: str = "coupled",
                 confidence_threshold: float = 0.0) -> list[Proposal]:
    """Chains of at most budgets[i] tokens. next_logits(active, drafts) gives the logits [len(active), V] of
    the next position of each active row, drafts[i] being what row i has drafted so far. A row stops at
    its budget, or (with a confidence threshold, as HF's assistant_confidence_threshold) after a token
    the draft gave less than the threshold: the length depends only on the draft's own q, so output
    stays exact. Under the rejection rule sampled rows keep their q."""
    params = [r.params for r in batch]
    st = SamplingTensors.from_params(params, vocab, device)  # q is processed exactly as p is
    history = None
    if any(p.penalized for p in params):
        history = TokenHistory([(r.tokens, r.num_prompt) for r in batch], params, vocab, device, eos_ids)
    keep_q = [rule == "rejection" and not r.params.greedy for r in batch]
    q_rows: list[list[torch.Tensor]] = [[] for _ in batch]
    drafts: list[list[int]] = [[] for _ in batch]
    active = [i for i, b in enumerate(budgets) if b > 0]
    step = 0
    while active:
        logits = next_logits(active, drafts)
        idx = torch.tensor(active, device=device)
        sub = st.rows(idx)
        adjusted = logits if sub.logit_bias is None else logits + sub.logit_bias
        if history is not None:
            adjusted = history.apply(adjusted, idx)
        q = probs_from_logits(adjusted, sub)
        tokens = q.argmax(-1)  # greedy rows
        shipping = [row for row, i in enumerate(active) if keep_q[i]]
        if shipping:  # the rejection rule ships q: sample from its compact form, what travels
            dense, shipped = SparseQ.truncate(q[shipping])
            q = q.index_copy(0, torch.tensor(shipping, device=device), dense.to(q.dtype))
            for row, compact in zip(shipping, shipped):
                q_rows[active[row]].append(compact)
        sampled = [row for row, i in enumerate(active) if not batch[i].params.greedy]
        if sampled:  # each row's own keyed draw (a greedy row takes the argmax)
            rows = [batch[active[row]] for row in sampled]
            tokens[sampled] = draft_choices(q[sampled], [r.seed for r in rows], [r.position + step for r in rows],
                                            rule).to(tokens.device)
        chosen = tokens.tolist()
        if history is not None:
            history.advance(tokens, idx)
        for i, token in zip(active, chosen):
            drafts[i].append(token)
        unsure: set[int] = set()
        if confidence_threshold > 0:
            confidence = torch.softmax(logits.float(), dim=-1).max(dim=-1).values.tolist()
            unsure = {i for row, i in enumerate(active) if confidence[row] < confidence_threshold}
        active = [i for i in active if len(drafts[i]) < budgets[i] and i not in unsure]
        step += 1
    return [Proposal.chain(d, SparseQ.stack(q_rows[i], vocab) if keep_q[i] and d else None)
            for i, d in enumerate(drafts)]

