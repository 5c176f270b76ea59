"""Statistics for distribution tests: the exact processed p at every output position (teacher-forced
through the HF model, processing written independently of cluster.sampling), and a goodness-of-fit test
of sampled tokens against those p's, per position.

The test: for each sample and position, rank the vocabulary by p (descending). A token falls into
category min(rank, C-1). Under the null each sample contributes p's top-C-1 masses and its tail mass to
the expected counts; Pearson's statistic over the C categories is then (conservatively) chi-square with
C-1 degrees of freedom. A token with p = 0 fails outright. It covers every position, prefixes need not
repeat, and misplaced mass among the likely tokens (what a wrong residual or a wrong q does) moves whole
categories.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chi2

CATEGORIES = 6


def processed(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent numpy implementation of temperature, top-k, then top-p (the smallest prefix of the
    top-k distribution whose mass reaches top_p)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(p, order, -1)
    keep = np.ones_like(sorted_p, dtype=bool)
    if top_k:  # top-k first, then top-p on what is left, renormalised (as HF's warpers and vLLM do)
        keep[..., top_k:] = False
        sorted_p = np.where(keep, sorted_p, 0.0)
        sorted_p /= sorted_p.sum(-1, keepdims=True)
    if top_p < 1.0:
        before = np.cumsum(sorted_p, -1) - sorted_p
        keep &= (before < top_p) | (np.arange(p.shape[-1]) == 0)
    kept = np.where(keep, sorted_p, 0.0)
    kept /= kept.sum(-1, keepdims=True)
    out = np.zeros_like(p)
    np.put_along_axis(out, order, kept, -1)
    return out


def exact_position_probs(model, prompt_ids: list[int], outputs: list[list[int]], positions: int, temperature: float,
                         top_k: int = 0, top_p: float = 1.0, batch: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [N, P], mask [N, P], p [N, P, V]) at output positions 0..P-1, from one teacher-forced
    forward per output. Outputs may end early (EOS): mask marks the positions each one reached, which
    depends only on the tokens before them, so conditioning on it keeps every position's test exact."""
    n_prompt = len(prompt_ids)
    tokens = np.zeros((len(outputs), positions), dtype=np.int64)
    mask = np.zeros((len(outputs), positions), dtype=bool)
    for i, o in enumerate(outputs):
        tokens[i, : min(len(o), positions)] = o[:positions]
        mask[i, : min(len(o), positions)] = True
    out = []
    for start in range(0, len(outputs), batch):
        rows = [prompt_ids + t[: positions - 1].tolist() for t in tokens[start:start + batch]]
        with torch.no_grad():
            logits = model(torch.tensor(rows)).logits[:, n_prompt - 1:n_prompt - 1 + positions].double().numpy()
        out.append(processed(logits, temperature, top_k, top_p))
    return tokens, mask, np.concatenate(out)


def rank_category_pvalues(tokens: np.ndarray, mask: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, int]:
    """tokens [N, P], mask [N, P], probs [N, P, V] -> (p-value per position, tokens emitted with zero p)."""
    n, positions, _ = probs.shape
    order = np.argsort(-probs, axis=-1, kind="stable")
    ranks = np.argsort(order, axis=-1)  # rank of each token id
    sorted_p = np.take_along_axis(probs, order, -1)
    zero = int(((np.take_along_axis(probs, tokens[..., None], -1)[..., 0] <= 0) & mask).sum())
    pvalues = np.zeros(positions)
    for j in range(positions):
        rows = np.flatnonzero(mask[:, j])
        cat = np.minimum(ranks[rows, j, tokens[rows, j]], CATEGORIES - 1)
        observed = np.bincount(cat, minlength=CATEGORIES)
        expected = np.concatenate([sorted_p[rows, j, : CATEGORIES - 1].sum(0),
                                   [sorted_p[rows, j, CATEGORIES - 1:].sum()]])
        keep = expected > 1e-9
        stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        stat += observed[~keep].sum() * 1e9  # a category with no mass must stay empty
        pvalues[j] = chi2.sf(stat, keep.sum() - 1)
    return pvalues, zero
