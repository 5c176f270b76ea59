"""Prompt-lookup ("search") drafting: continue the latest earlier occurrence of the sequence's last n tokens.

No model and no distribution: proposals are deterministic (q is one-hot). Pays off where the output
copies from the prompt or from itself: code edits, summaries, quoting, repetition.

Each sequence keeps an index from every n-gram it contains (ngram_min <= n <= ngram_max) to where its
latest occurrence continues, extended by the new tokens only: a lookup is a few dict probes (a few us)
instead of a scan of the whole context (70 us at 330 tokens), which at 32 streams was 2 ms of every step.
"""

from __future__ import annotations

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter, DraftRequest


class NgramIndex:
    """n-gram -> the position just after its latest occurrence that has a continuation."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.maps: list[dict[tuple[int, ...], int]] = [{} for _ in range(ngram_max + 1)]
        self.seen = 0  # tokens indexed: the n-grams ending before position seen - 1

    def extend(self, tokens: list[int]) -> NgramIndex:
        """Index the n-grams that end at positions seen - 1 .. len(tokens) - 2 (each has a next token; the
        one ending at the last position is the suffix being looked up, never its own match)."""
        for end in range(max(self.seen - 1, 0), len(tokens) - 1):  # an n-gram tokens[end - n + 1 : end + 1]
            for n in range(self.ngram_min, min(self.ngram_max, end + 1) + 1):
                self.maps[n][tuple(tokens[end - n + 1 : end + 1])] = end + 1
        self.seen = max(self.seen, len(tokens))
        return self

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Tokens after the latest earlier match of the longest suffix (ngram_max down to ngram_min)."""
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            start = self.maps[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + k]
        return []


def lookup_continuation(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Tokens after the latest earlier match of the longest suffix (ngram_max down to ngram_min)."""
    return NgramIndex(ngram_min, ngram_max).extend(tokens).lookup(tokens, k)


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._indexes: dict[str, NgramIndex] = {}

    def propose(self, batch: list[DraftRequest]) -> list[Proposal]:
        out = []
        for r in batch:
            index = self._indexes.get(r.seq_id)
            if index is None or len(r.tokens) < index.seen:  # new, or out of step (sequences only grow)
                index = self._indexes[r.seq_id] = NgramIndex(self.ngram_min, self.ngram_max)
            out.append(Proposal.chain(index.extend(r.tokens).lookup(r.tokens, r.budget)))
        return out

    def release(self, seq_id: str) -> None:
        self._indexes.pop(seq_id, None)

    @property
    def num_sequences(self) -> int:
        return len(self._indexes)


def build(section, context) -> NgramDrafter:
    return NgramDrafter(section.ngram_min, section.ngram_max)
