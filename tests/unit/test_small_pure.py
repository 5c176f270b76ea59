"""N-gram lookup, stop strings, adaptive K: small pure functions."""

from cluster.adaptive_k import fit_budget, next_k
from cluster.drafters.base import DraftRequest
from cluster.drafters.ngram import NgramDrafter, lookup_continuation
from cluster.text import find_stop, holdback
from cluster.types import SamplingParams


def test_lookup_continues_latest_match_of_longest_suffix():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # suffix [2, 3] occurs at 1 and 5; latest is 5 -> continue with 7, 8, 5
    assert lookup_continuation(tokens, 3, 1, 4) == [7, 8, 5]
    # longer suffix [5, 2, 3] has no earlier match, so the 2-gram decides
    assert lookup_continuation(tokens, 10, 3, 4) == []


def test_lookup_truncates_at_end_and_handles_short_sequences():
    assert lookup_continuation([4, 5, 4], 5, 1, 3) == [5, 4]
    assert lookup_continuation([4], 5, 1, 3) == []


def test_ngram_drafter_batch_has_no_probs():
    drafter = NgramDrafter(1, 3)
    p = SamplingParams()
    proposal = drafter.propose([DraftRequest("a", [1, 2, 1], 2, p), DraftRequest("b", [7, 8], 2, p)])
    assert proposal.tokens == [[2, 1], []] and proposal.q(0) is None and proposal.q(1) is None


def test_find_stop_and_holdback():
    assert find_stop("hello world", ("wor", "lo")) == 3
    assert find_stop("hello", ("x",)) == -1
    assert holdback("abc\n#", ("\n##",)) == 2  # "\n#" may begin the stop string
    assert holdback("abc", ("\n##",)) == 0
    assert holdback("caf\ufffd", ()) == 1  # unfinished multi-byte character


def test_adaptive_k():
    assert next_k(4, 4, 4, 1, 8) == 6
    assert next_k(7, 7, 7, 1, 8) == 8
    assert next_k(4, 4, 1, 1, 8) == 3
    assert next_k(1, 1, 0, 1, 8) == 1
    assert next_k(4, 0, 0, 1, 8) == 4  # nothing proposed: no evidence


def test_fit_budget_takes_from_the_longest():
    assert fit_budget([4, 4, 1], 0) == [4, 4, 1]  # unlimited
    assert fit_budget([4, 4, 1], 12) == [4, 4, 1]  # 3 pending + 9 drafts fit
    assert fit_budget([6, 2, 1], 9) == [3, 2, 1]  # 3 pending + 6 drafts
    assert fit_budget([3] * 4, 12) == [2] * 4
    assert fit_budget([3] * 16, 12) == [0] * 16  # plain decoding already fills the pass
