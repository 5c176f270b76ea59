"""Search drafting ("SuffixDecoding"-style): continuations looked up in what has been seen, as a tree.

Each request has its own index over its prompt and output; a shared, size-bounded index holds the
outputs of recent requests (agentic and self-refining workloads repeat them); an optional read-only
corpus index is built once from files. An index maps every context of 1..max_context tokens to counts of
the token that followed it. To propose, the drafter finds the longest context it knows at the end of
the sequence, then grows a tree best-first: each node's children are the continuations seen after its
own context, scored by frequency, a path's score the product along it; nodes are added while their
score is at least `min_score` and the budget lasts, and no deeper than `alpha` x the matched context
length. Proposals are deterministic (no q), so acceptance stays exact under either rule.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from pathlib import Path

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter, DraftRequest


class ContextIndex:
    """context (tuple of up to max_context tokens) -> Counter of next tokens."""

    def __init__(self, max_context: int = 8):
        self.max_context = max_context
        self.table: dict[tuple[int, ...], Counter] = {}

    def add(self, tokens: list[int], start: int = 0, sign: int = 1) -> None:
        """Count the continuations of the tokens from position `start` on (sign -1 removes them)."""
        for i in range(max(start, 1), len(tokens)):
            nxt = tokens[i]
            for n in range(1, min(self.max_context, i) + 1):
                ctx = tuple(tokens[i - n:i])
                counts = self.table.get(ctx)
                if counts is None:
                    if sign < 0:
                        continue
                    counts = self.table[ctx] = Counter()
                counts[nxt] += sign
                if counts[nxt] <= 0:
                    del counts[nxt]
                    if not counts:
                        del self.table[ctx]

    def longest(self, tokens: list[int]) -> int:
        """Length of the longest suffix of `tokens` this index has seen a continuation for."""
        for n in range(min(self.max_context, len(tokens)), 0, -1):
            if tuple(tokens[-n:]) in self.table:
                return n
        return 0

    def next(self, tokens: list[int], n: int) -> Counter | None:
        return self.table.get(tuple(tokens[-n:])) if n else None


class SuffixDrafter(Drafter):
    name = "suffix"

    def __init__(self, max_context: int = 8, alpha: float = 2.0, min_score: float = 0.1, max_width: int = 3,
                 shared_requests: int = 256, corpus: ContextIndex | None = None):
        self.max_context, self.alpha, self.min_score, self.max_width = max_context, alpha, min_score, max_width
        self.own: dict[str, ContextIndex] = {}
        self.indexed: dict[str, int] = {}  # tokens of each request already in its own index
        self.shared = ContextIndex(max_context)  # outputs of recent requests, all of them
        self.shared_outputs: OrderedDict[str, list[int]] = OrderedDict()
        self.shared_requests = shared_requests
        self.corpus = corpus
        self.num_prompt: dict[str, int] = {}
        self.tokens: dict[str, list[int]] = {}

    @property
    def num_sequences(self) -> int:
        return len(self.own)

    def propose(self, batch: list[DraftRequest]) -> list[Proposal]:
        return [self._propose(r) for r in batch]

    def _propose(self, r: DraftRequest) -> Proposal:
        own = self.own.setdefault(r.seq_id, ContextIndex(self.max_context))
        seen = self.indexed.get(r.seq_id, 0)
        own.add(r.tokens, seen)
        self.indexed[r.seq_id] = len(r.tokens)
        self.num_prompt[r.seq_id] = r.num_prompt
        self.tokens[r.seq_id] = r.tokens  # the worker's own list: complete when the request is released
        indexes = [i for i in (own, self.shared, self.corpus) if i is not None]
        tail = r.tokens[-self.max_context:]  # all a lookup reads (copying the whole context per node cost O(L))
        matched = max(i.longest(tail) for i in indexes)
        if matched == 0:
            return Proposal()
        max_depth = max(1, int(self.alpha * matched))
        tokens, parents = [], []
        # Best-first over (score, node path): a path's score is the product of its steps' frequencies.
        heap = [(-1.0, 0, -1, [])]  # (-score, tie, node index, path tokens)
        tie = 0
        while heap and len(tokens) < r.budget:
            neg, _, node, path = heapq.heappop(heap)
            if node >= 0 and len(path) >= max_depth:
                continue
            context = (tail + path)[-self.max_context:]
            counts = self._continuations(indexes, context)
            if not counts:
                continue
            total = sum(counts.values())
            for token, count in counts.most_common(self.max_width):
                score = -neg * count / total
                if score < self.min_score or len(tokens) >= r.budget:
                    break
                tokens.append(token)
                parents.append(node)
                tie += 1
                heapq.heappush(heap, (-score, tie, len(tokens) - 1, path + [token]))
        return Proposal(tokens, parents)

    def _continuations(self, indexes: list[ContextIndex], context: list[int]) -> Counter:
        """Continuation counts at the longest context any index knows; the request's own index counts
        double (its repetitions are the most telling)."""
        lengths = [i.longest(context) for i in indexes]
        best = max(lengths)
        merged: Counter = Counter()
        for weight, index, length in zip((2, 1, 1), indexes, lengths):
            if best and length == best:
                for token, count in index.next(context, best).items():
                    merged[token] += weight * count
        return merged

    def release(self, seq_id: str) -> None:
        """The request is done: its output joins the shared index (the oldest request's leaves it)."""
        self.own.pop(seq_id, None)
        self.indexed.pop(seq_id, None)
        tokens = self.tokens.pop(seq_id, None)
        num_prompt = self.num_prompt.pop(seq_id, 0)
        if not tokens:
            return
        output = list(tokens[max(num_prompt - self.max_context, 0):])  # with a little of the prompt as context
        self.shared.add(output)
        self.shared_outputs[seq_id] = output
        while len(self.shared_outputs) > self.shared_requests:
            _, old = self.shared_outputs.popitem(last=False)
            self.shared.add(old, sign=-1)


def build_corpus(paths: list[Path], tokenizer, max_tokens: int, max_context: int = 8) -> ContextIndex:
    """A read-only index over text files (e.g. Python sources), tokenised once at start."""
    index = ContextIndex(max_context)
    budget = max_tokens
    for path in paths:
        if budget <= 0:
            break
        ids = tokenizer.encode(path.read_text(errors="ignore"))[:budget]
        index.add(ids)
        budget -= len(ids)
    return index


def build(section, context) -> SuffixDrafter:
    corpus = None
    if section.corpus_glob:
        from cluster.models.loader import load_tokenizer

        tokenizer = load_tokenizer(context.target)
        corpus = build_corpus(sorted(Path().glob(section.corpus_glob)), tokenizer, section.corpus_tokens,
                              section.max_context)
    return SuffixDrafter(section.max_context, section.alpha, section.min_score, section.max_width,
                         section.shared_requests, corpus)
