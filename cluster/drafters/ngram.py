"""Prompt-lookup ("search") drafting: continue the latest earlier occurrence of the sequence's last n tokens.

No model and no distribution: proposals are deterministic (q is one-hot). Pays off where the output
copies from the prompt or from itself: code edits, summaries, quoting, repetition.
"""

from __future__ import annotations

import numpy as np

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter, DraftRequest


def lookup_continuation(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Tokens after the latest earlier match of the longest suffix (ngram_max down to ngram_min)."""
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(ngram_max, len(arr) - 1), ngram_min - 1, -1):
        suffix = arr[-n:]
        # Windows starting at 0 .. len-n-1: every earlier occurrence, excluding the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, batch: list[DraftRequest]) -> list[Proposal]:
        return [Proposal.chain(lookup_continuation(r.tokens, r.budget, self.ngram_min, self.ngram_max))
                for r in batch]


def build(section, context) -> NgramDrafter:
    return NgramDrafter(section.ngram_min, section.ngram_max)
