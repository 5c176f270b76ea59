"""Logits -> probabilities, applied identically to target (p) and draft (q) so the acceptance rule stays exact."""

from __future__ import annotations

import torch


def process_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Turn logits [B, ..., V] into probabilities with per-row parameters (each a [B] tensor).

    temperature == 0 gives a one-hot argmax (greedy), so greedy decoding is the sampling rule with
    one-hot p. top_k == 0 and top_p == 1 switch those filters off.
    """
    logits = logits.float()
    extra = (1,) * (logits.dim() - 2)  # broadcast per-row params over middle (position) dims
    greedy = (temperature == 0).view(-1, *extra, 1)
    if bool(greedy.all()):  # the common serving case: skip softmax and filters entirely
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).view(-1, *extra, 1)
    scaled = logits / t
    if bool(((top_k > 0) | (top_p < 1)).any()):
        scaled = _filter_top_k_top_p(scaled, top_k.view(-1, *extra, 1), top_p.view(-1, *extra, 1))
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy, one_hot, probs)
    return probs


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    drop = (top_k > 0) & (rank >= top_k)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it is >= top_p.
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop = drop | (mass_before >= top_p)
    drop[..., 0] = False  # the most likely token always survives
    return scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token per row of probs [..., V] from uniforms u [...] in [0, 1).

    Taking the uniforms as input keeps this a pure function: the caller owns the per-request RNG.
    """
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:]
    idx = torch.searchsorted(cdf, (u.unsqueeze(-1) * total).contiguous(), right=True).squeeze(-1)
    # Guard the float edge (u*total == total) and never return a zero-probability token.
    idx = idx.clamp_(max=probs.shape[-1] - 1)
    bad = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(bad.any()):
        idx = torch.where(bad, probs.argmax(-1), idx)
    return idx
