"""Greedy exactness in a reduced dtype: every emitted token must be the argmax of the target's logits in
a dense teacher-forced pass over the final sequence, except at near-ties, where the top two logits are
closer than the dtype's tolerance (different matrix shapes round differently, so which of two tied
tokens wins is not defined). Near-ties are counted and reported; anything else is a failure."""

from __future__ import annotations

import torch

# A near-tie is a top-2 gap below STEPS representable steps of the dtype at the top logit's magnitude (bf16
# keeps 8 significant bits: at logits of 16-32 a step is 0.125), and never below FLOOR. Two evaluations of
# one bf16 model (other kernels, shapes, accumulation orders) differ by a few steps: measured on
# SmolLM2-135M against fp32, the largest logit error per position has median 0.4 (3 steps), max 1.5.
STEPS = 4
FLOOR = {torch.float32: 1e-3, torch.bfloat16: 0.0, torch.float16: 0.0}
MANTISSA_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


def near_tie_tolerance(top: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per position: STEPS steps of `dtype` at the magnitude of the top logit `top`, at least FLOOR."""
    step = torch.exp2(torch.floor(torch.log2(top.abs().clamp_min(1e-6))) - (MANTISSA_BITS.get(dtype, 24) - 1))
    return torch.clamp_min(STEPS * step, FLOOR.get(dtype, 1e-3))


def teacher_forced_check(model, prompt_ids: list[int], output_ids: list[int]) -> dict:
    """{positions, near_ties, mismatches}: mismatches are argmax disagreements outside near-ties."""
    dtype = next(model.parameters()).dtype
    if not output_ids:
        return {"positions": 0, "near_ties": 0, "mismatches": 0, "mismatch_gaps": []}
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids + output_ids[:-1]], device=next(model.parameters()).device)
        logits = model(ids).logits[0, len(prompt_ids) - 1:].float()
    top2 = logits.topk(2, dim=-1)
    gap = (top2.values[:, 0] - top2.values[:, 1]).cpu()
    emitted = torch.tensor(output_ids)
    agree = top2.indices[:, 0].cpu() == emitted
    tolerance = near_tie_tolerance(top2.values[:, 0].cpu(), dtype)
    tie = gap < tolerance
    miss = ~agree & ~tie
    return {"positions": len(output_ids), "near_ties": int(tie.sum()), "mismatches": int(miss.sum()),
            # how far outside the tolerance each mismatch was, in units of it (1.0: just outside)
            "mismatch_gaps": [round(float(g), 3) for g in (gap[miss] / tolerance[miss]).tolist()]}


def check_outputs(model, prompt_ids: list[list[int]], outputs: list[list[int]]) -> dict:
    """teacher_forced_check summed over many outputs, plus near_tie_rate and exact (no mismatch)."""
    totals = {"positions": 0, "near_ties": 0, "mismatches": 0, "mismatch_gaps": []}
    for ids, out in zip(prompt_ids, outputs):
        for key, value in teacher_forced_check(model, ids, out).items():
            totals[key] += value
    return {**totals, "near_tie_rate": round(totals["near_ties"] / max(totals["positions"], 1), 4),
            "exact": totals["mismatches"] == 0}
