"""Greedy exactness in a reduced dtype: every emitted token must be the argmax of the target's logits in
a dense teacher-forced pass over the final sequence, except at near-ties, where the top two logits are
closer than the dtype's tolerance (different matrix shapes round differently, so which of two tied
tokens wins is not defined). Near-ties are counted and reported; anything else is a failure."""

from __future__ import annotations

import torch

NEAR_TIE = {torch.float32: 1e-3, torch.bfloat16: 0.125, torch.float16: 0.02}


def teacher_forced_check(model, prompt_ids: list[int], output_ids: list[int]) -> dict:
    """{positions, near_ties, mismatches}: mismatches are argmax disagreements outside near-ties."""
    tol = NEAR_TIE.get(next(model.parameters()).dtype, 1e-3)
    if not output_ids:
        return {"positions": 0, "near_ties": 0, "mismatches": 0}
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids + output_ids[:-1]], device=next(model.parameters()).device)
        logits = model(ids).logits[0, len(prompt_ids) - 1:].float()
    top2 = logits.topk(2, dim=-1)
    gap = (top2.values[:, 0] - top2.values[:, 1]).cpu()
    emitted = torch.tensor(output_ids)
    agree = top2.indices[:, 0].cpu() == emitted
    tie = gap < tol
    return {"positions": len(output_ids), "near_ties": int(tie.sum()), "mismatches": int((~agree & ~tie).sum())}
