"""MEGABYTE's local model as the draft tier (two tiers: global model in the target actors, local model in
the draft actors). The target returns, with every verdict, the conditioning of the patch the next bytes
fall in (cluster/models/megabyte_backend.py); this drafter runs the local model over it and writes the
rest of that patch, one byte at a time, sampling q = the local model's own distribution (processed as the
target processes p). The target then runs the global model once over the finished patch and checks the
drafted bytes with one teacher-forced local pass: two actor calls per patch, and since draft and target
compute the same distribution, the coupled rule accepts them all (up to float near-ties), so output is
exactly plain MEGABYTE's. A patch's last byte is the target's own: the next patch needs it fed first.
"""

from __future__ import annotations

import torch

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter, DraftRequest
from cluster.drafters.chains import draft_chains
from cluster.models.megabyte import MegabyteForCausalLM


class LocalTierDrafter(Drafter):
    name = "megabyte_local"

    def __init__(self, model: MegabyteForCausalLM, eos_ids: tuple[int, ...] = (), rule: str = "coupled"):
        self.model, self.eos_ids, self.rule = model, eos_ids, rule
        self.patch, self.vocab = model.config.patch_size, model.config.vocab_size
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def propose(self, batch: list[DraftRequest]) -> list[Proposal]:
        p = self.patch
        conds, budgets = [], []
        for r in batch:
            cond = None if r.hidden is None else torch.as_tensor(r.hidden).to(self.device, torch.float32)
            if cond is None or torch.isnan(cond).any():  # the next byte opens a patch: nothing to draft from
                conds.append(None)
                budgets.append(0)
                continue
            conds.append(cond.view(p, -1).to(next(self.model.parameters()).dtype))
            budgets.append(min(r.budget, p - len(r.tokens) % p))  # to the end of the open patch

        def next_logits(active: list[int], drafts: list[list[int]]) -> torch.Tensor:
            """One local pass over each active row's open patch so far (right-padded: the model is causal)."""
            prevs = []
            for i in active:
                tokens = batch[i].tokens + drafts[i]
                n = len(tokens)
                prevs.append([self.vocab] + tokens[n - n % p: n])  # the byte before each position in the patch
            width = max(len(x) for x in prevs)
            prev = torch.tensor([x + [self.vocab] * (width - len(x)) for x in prevs], device=self.device)
            cond = torch.stack([conds[i][:width] for i in active])
            logits = self.model.local_logits(cond, prev)
            return logits[torch.arange(len(active)), torch.tensor([len(x) - 1 for x in prevs])].float()

        return draft_chains(batch, budgets, next_logits, self.vocab, self.device, self.eos_ids, self.rule)


def build(section, context) -> LocalTierDrafter:
    """The local model of the target's own MEGABYTE directory (in process: the target's module itself)."""
    from cluster.models.loader import load_model

    model = context.target_model if context.target_model is not None else load_model(context.target, context.device)
    if not isinstance(model, MegabyteForCausalLM):
        raise ValueError(f"drafter.megabyte_local: the target is a {type(model).__name__}, not MEGABYTE")
    return LocalTierDrafter(model, context.eos_ids, context.rule)
