"""The acceptance rule, without models: exactness of the output distribution is checked statistically."""

import pytest
import torch
from scipy.stats import chisquare

from cluster.sampling.acceptance import verify_draft

V = 6
N = 40000  # independent trials, run as one batch
GEN = torch.Generator().manual_seed(1234)


def _dist(*weights):
    w = torch.tensor(weights, dtype=torch.float32)
    return w / w.sum()


P1 = _dist(5, 1, 3, 0, 2, 4)
P2 = _dist(1, 1, 6, 2, 0, 1)
DRAFTS = {
    "random": (_dist(1, 4, 1, 2, 2, 1), _dist(3, 1, 1, 1, 1, 1)),
    "uniform": (torch.full((V,), 1 / V), torch.full((V,), 1 / V)),
    "disjoint": (_dist(0, 0, 0, 1, 0, 0), _dist(0, 0, 0, 0, 1, 0)),  # only tokens p gives zero mass
    "equal": (P1, P2),
}


def _trial(q1, q2, k=2, one_hot=False):
    """N independent 2-token drafts from q, verified against fixed p. Returns (n, next, drafts)."""
    bonus = _dist(1, 1, 1, 1, 1, 1)
    target = torch.stack([P1, P2, bonus]).expand(N, 3, V)
    d1 = torch.multinomial(q1, N, replacement=True, generator=GEN)
    d2 = torch.multinomial(q2, N, replacement=True, generator=GEN)
    drafts = torch.stack([d1, d2], 1)[:, :k]
    q = None if one_hot else torch.stack([q1, q2]).expand(N, 2, V)[:, :k]
    n, nxt = verify_draft(
        target[:, : k + 1], drafts, torch.full((N,), k), q, torch.rand(N, k, generator=GEN), torch.rand(N, generator=GEN)
    )
    return n, nxt, drafts


def _emitted(n, nxt, drafts, position):
    """Token emitted at `position` (0-based) for trials that reached it."""
    reached = n >= position
    tok = torch.where(n > position, drafts[:, min(position, drafts.shape[1] - 1)], nxt)
    return tok[reached]


def _assert_distributed_as(tokens, p):
    counts = torch.bincount(tokens, minlength=V)
    assert counts[p == 0].sum() == 0, "emitted a token the target gives zero probability"
    keep = p > 0
    expected = p[keep].double() / p[keep].double().sum() * len(tokens)
    assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-4


@pytest.mark.parametrize("name", sorted(DRAFTS))
def test_output_is_distributed_as_target(name):
    q1, q2 = DRAFTS[name]
    n, nxt, drafts = _trial(q1, q2)
    _assert_distributed_as(_emitted(n, nxt, drafts, 0), P1)
    second = _emitted(n, nxt, drafts, 1)  # conditional on the first draft being accepted
    if name == "disjoint":
        assert len(second) == 0  # p gives the draft's tokens zero mass: never accepted
    else:
        _assert_distributed_as(second, P2)


def test_one_hot_draft_without_probs_is_exact():
    # A deterministic drafter always proposes token 2 then 0 (n-gram style: q = one-hot, passed as None).
    n, nxt, drafts = _trial(_dist(0, 0, 1, 0, 0, 0), _dist(1, 0, 0, 0, 0, 0), one_hot=True)
    _assert_distributed_as(_emitted(n, nxt, drafts, 0), P1)
    _assert_distributed_as(_emitted(n, nxt, drafts, 1), P2)


def test_acceptance_rate_is_sum_of_min_p_q():
    q1, q2 = DRAFTS["random"]
    n, _, _ = _trial(q1, q2, k=1)
    expected = torch.minimum(P1, q1).sum().item()
    assert abs(n.float().mean().item() - expected) < 0.01


def test_draft_equal_to_target_accepts_everything():
    n, _, _ = _trial(P1, P2)
    assert (n == 2).all()


def test_greedy_accepts_matching_prefix_then_corrects():
    p = torch.zeros(3, 4, V)
    for row in range(3):
        for pos, tok in enumerate([1, 2, 3, 4]):
            p[row, pos, tok] = 1.0
    drafts = torch.tensor([[1, 2, 3], [1, 5, 3], [0, 2, 3]])
    n, nxt = verify_draft(p, drafts, torch.tensor([3, 3, 3]), None, torch.rand(3, 3), torch.rand(3))
    assert n.tolist() == [3, 1, 0]
    assert nxt.tolist() == [4, 2, 1]  # bonus after full acceptance; target's token at first mismatch


def test_ragged_draft_lengths_and_k_zero():
    p = torch.zeros(2, 3, V)
    p[:, 0, 1] = p[:, 1, 2] = p[:, 2, 3] = 1.0
    drafts = torch.tensor([[1, 2], [1, 0]])  # row 1 drafted only one token; its pad must not count
    n, nxt = verify_draft(p, drafts, torch.tensor([2, 1]), None, torch.zeros(2, 2), torch.zeros(2))
    assert n.tolist() == [2, 1] and nxt.tolist() == [3, 2]
    n, nxt = verify_draft(p[:, :1], drafts[:, :0], torch.tensor([0, 0]), None, torch.zeros(2, 0), torch.zeros(2))
    assert n.tolist() == [0, 0] and nxt.tolist() == [1, 1]
