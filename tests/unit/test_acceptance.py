"""The acceptance rule, without models: exactness of the output distribution is checked statistically.

Power (`python -m tools.power`: the noncentral chi-square at N = 400000, alpha = 1e-4): a residual
whose mass is 5% wrong (0.95 r + 0.05 uniform over p's support) is caught with probability > 0.999 at
every position where a residual is drawn; so is a bonus token sampled from the residual instead of p
(the 'all accepted counts as rejected' mutant, which every greedy test misses).
"""

import pytest
import torch
from scipy.stats import chisquare

from cluster.sampling.acceptance import verify_draft

V = 6
N = 400_000  # independent trials, run as one batch


def _dist(*weights):
    w = torch.tensor(weights, dtype=torch.float32)
    return w / w.sum()


P1 = _dist(5, 1, 3, 0, 2, 4)
P2 = _dist(1, 1, 6, 2, 0, 1)
BONUS = _dist(2, 1, 4, 1, 1, 3)
DRAFTS = {
    "random": (_dist(1, 4, 1, 2, 2, 1), _dist(3, 1, 1, 1, 1, 1)),
    "uniform": (torch.full((V,), 1 / V), torch.full((V,), 1 / V)),
    "disjoint": (_dist(0, 0, 0, 1, 0, 0), _dist(0, 0, 0, 0, 1, 0)),  # only tokens p gives zero mass
    "equal": (P1, P2),
    "filtered": (_dist(0, 3, 1, 0, 2, 0), _dist(1, 0, 5, 0, 0, 2)),  # zeros as top-k / top-p leave them
}


def _trial(q1, q2, k=2, one_hot=False, seed=1234, num_draft=None):
    """N independent k-token drafts from q, verified against fixed p (P1, P2, then BONUS)."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.stack([P1, P2, BONUS]).expand(N, 3, V)
    d1 = torch.multinomial(q1, N, replacement=True, generator=gen)
    d2 = torch.multinomial(q2, N, replacement=True, generator=gen)
    drafts = torch.stack([d1, d2], 1)[:, :k]
    q = None if one_hot else torch.stack([q1, q2]).expand(N, 2, V)[:, :k]
    num_draft = torch.full((N,), k) if num_draft is None else num_draft
    n, nxt = verify_draft(target[:, : k + 1], drafts, num_draft, q, torch.rand(N, k, generator=gen),
                          torch.rand(N, generator=gen))
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
def test_output_is_distributed_as_target_at_every_position(name):
    q1, q2 = DRAFTS[name]
    n, nxt, drafts = _trial(q1, q2)
    _assert_distributed_as(_emitted(n, nxt, drafts, 0), P1)
    second = _emitted(n, nxt, drafts, 1)  # conditional on the first draft being accepted
    bonus = _emitted(n, nxt, drafts, 2)  # both accepted: the bonus token, sampled from p at position 3
    if name == "disjoint":
        assert len(second) == 0 and len(bonus) == 0  # p gives the draft's tokens zero mass: never accepted
        return
    _assert_distributed_as(second, P2)
    assert len(bonus) > 2000
    _assert_distributed_as(bonus, BONUS)


def test_one_hot_draft_without_probs_is_exact():
    # A deterministic drafter always proposes token 2 then 0 (n-gram style: q = one-hot, passed as None).
    n, nxt, drafts = _trial(_dist(0, 0, 1, 0, 0, 0), _dist(1, 0, 0, 0, 0, 0), one_hot=True)
    _assert_distributed_as(_emitted(n, nxt, drafts, 0), P1)
    _assert_distributed_as(_emitted(n, nxt, drafts, 1), P2)
    _assert_distributed_as(_emitted(n, nxt, drafts, 2), BONUS)


def test_ragged_rows_sample_their_own_bonus():
    """Rows that drafted one token in a batch drafting two: their bonus comes from p at position 2."""
    q1, q2 = DRAFTS["random"]
    ragged = torch.tensor([1, 2]).repeat(N // 2)
    n, nxt, drafts = _trial(q1, q2, num_draft=ragged)
    short = ragged == 1
    assert (n[short] <= 1).all()
    _assert_distributed_as(nxt[short & (n == 1)], P2)  # bonus of a 1-token draft
    _assert_distributed_as(_emitted(n[~short], nxt[~short], drafts[~short], 1), P2)


def test_acceptance_rate_is_sum_of_min_p_q():
    q1, q2 = DRAFTS["random"]
    n, _, _ = _trial(q1, q2, k=1)
    expected = torch.minimum(P1, q1).sum().item()
    sigma = (expected * (1 - expected) / N) ** 0.5
    assert abs(n.float().mean().item() - expected) < 4 * sigma


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


def test_residual_without_mass_falls_back_to_p():
    """p == q exactly but the draft is 'rejected' by a uniform at the float edge: the residual is all
    zeros, and the token must still come from p, never from a zero-probability id."""
    p = _dist(0, 1, 1, 0, 0, 0).expand(1, 2, V).clone()
    q = p[:, :1].clone()
    n, nxt = verify_draft(p, torch.tensor([[1]]), torch.tensor([1]), q, torch.tensor([[1.0]]), torch.tensor([0.7]))
    assert n.tolist() == [0] and nxt.item() in (1, 2)
