"""N-gram lookup, stop strings, adaptive K: small pure functions."""

from cluster.drafters.base import DraftRequest
from cluster.drafters.ngram import NgramDrafter, lookup_continuation
from cluster.text import find_stop, holdback
from cluster.types import SamplingParams


def test_lookup_continues_latest_match_of_longest_suffix():
    # Suffix [5, 2, 3]: the 3-gram occurs once (continues 9), its 2-gram [2, 3] last occurs later
    # (continues 7) and its 1-gram [3] later still (continues 8). Longest first must give 9.
    tokens = [5, 2, 3, 9, 9, 1, 2, 3, 7, 4, 3, 8, 5, 2, 3]
    assert lookup_continuation(tokens, 2, 1, 4) == [9, 9]
    assert lookup_continuation(tokens, 2, 1, 2) == [7, 4]  # capped at 2-grams: the latest 2-gram match
    assert lookup_continuation(tokens, 2, 1, 1) == [8, 5]  # 1-grams only: the latest [3]
    assert lookup_continuation(tokens, 2, 4, 4) == []  # no earlier [3, 5, 2, 3]
    # Of several matches of the same n-gram, the latest wins.
    assert lookup_continuation([1, 2, 7, 1, 2, 8, 1, 2], 1, 2, 2) == [8]


def test_lookup_truncates_at_end_and_handles_short_sequences():
    assert lookup_continuation([4, 5, 4], 5, 1, 3) == [5, 4]
    assert lookup_continuation([4], 5, 1, 3) == []


def test_the_incremental_index_equals_a_full_scan():
    """The drafter's index, extended a few tokens at a time, proposes what a scan of the whole sequence
    finds (an independent numpy reference), at every length."""
    import random

    import numpy as np

    def scan(tokens, k, lo, hi):
        arr = np.asarray(tokens)
        for n in range(min(hi, len(arr) - 1), lo - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                return arr[hits[-1] + n: hits[-1] + n + k].tolist()
        return []

    rng = random.Random(0)
    for lo, hi in ((1, 4), (2, 3), (1, 1)):
        drafter, tokens = NgramDrafter(lo, hi), []
        while len(tokens) < 300:
            tokens.extend(rng.randrange(6) for _ in range(rng.randint(1, 5)))  # few symbols: many repeats
            got = drafter.propose([DraftRequest("s", tokens, 4, SamplingParams())])[0].tokens
            assert got == scan(tokens, 4, lo, hi), (lo, hi, len(tokens))
    drafter.release("s")
    assert drafter.num_sequences == 0


def test_ngram_drafter_proposes_chains_without_q():
    drafter = NgramDrafter(1, 3)
    p = SamplingParams()
    proposals = drafter.propose([DraftRequest("a", [1, 2, 1], 2, p), DraftRequest("b", [7, 8], 2, p)])
    assert [x.tokens for x in proposals] == [[2, 1], []]
    assert all(x.is_chain and x.q is None for x in proposals)


def test_find_stop_and_holdback():
    assert find_stop("hello world", ("wor", "lo")) == 3
    assert find_stop("hello", ("x",)) == -1
    assert holdback("abc\n#", ("\n##",)) == 2  # "\n#" may begin the stop string
    assert holdback("abc", ("\n##",)) == 0
    assert holdback("caf\ufffd", ()) == 1  # unfinished multi-byte character


def test_sparse_q_is_exactly_what_the_drafter_samples_from_and_small():
    """The compact draft distribution: the dense row a drafter samples from equals what the target
    rebuilds from the shipped form, it holds at least MASS of q (or SUPPORT tokens), and 8 nodes travel in
    under 2 KB."""
    import pickle

    import torch

    from cluster.core.messages import Proposal, SparseQ

    g = torch.Generator().manual_seed(0)
    rows, dense_rows = [], []
    qs = torch.stack([torch.softmax(torch.randn(151936, generator=g) / t, -1) for t in (0.3, 1.0, 3.0, 1.0, 0.5, 2.0,
                                                                                        1.0, 0.1)])
    for q in qs:  # one row at a time
        (dense,), ((ids, weights),) = SparseQ.truncate(q.unsqueeze(0))
        assert abs(float(dense.sum()) - 1) < 1e-5 and (dense > 0).sum() == len(ids) <= SparseQ.SUPPORT
        assert float(q[ids].sum()) >= SparseQ.MASS or len(ids) == SparseQ.SUPPORT
        rows.append((ids, weights))
        dense_rows.append(dense)
    shipped = SparseQ.stack(rows, 151936)
    assert torch.equal(shipped[0:8], torch.stack(dense_rows)) and torch.equal(shipped[3], dense_rows[3])
    together, compact = SparseQ.truncate(qs)  # as a drafter's batch does: the same rows, the same supports
    assert torch.equal(together, shipped[0:8]) and all(torch.equal(a[0], b[0]) for a, b in zip(compact, rows))
    proposal = Proposal.chain(list(range(8)), shipped)
    assert len(pickle.dumps(proposal)) < 2048
    assert torch.equal(proposal.truncated(3).q[0:3], shipped[0:3])
