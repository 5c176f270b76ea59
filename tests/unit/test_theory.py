"""The theory formulas against the acceptance rule itself: drafts accepted i.i.d. with probability a
give E tokens per pass, and S follows from E and the step costs."""

import pytest
import torch

from cluster.sampling.acceptance import verify_draft
from cluster.sampling.theory import expected_speedup, expected_tokens_per_pass


def test_expected_tokens_limits():
    assert expected_tokens_per_pass(0.0, 4) == 1.0
    assert expected_tokens_per_pass(1.0, 4) == 5.0
    assert expected_tokens_per_pass(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


@pytest.mark.parametrize("a, k", [(0.3, 2), (0.6, 4), (0.85, 8)])
def test_tokens_per_pass_of_the_rule_match_e(a, k):
    """p and q built so that sum(min(p, q)) = a at every position: the rule's mean tokens per pass
    (accepted + 1) must be E(a, K) within 4 standard errors."""
    n, v = 200_000, 4
    q = torch.tensor([1.0, 0.0, 0.0, 0.0])  # the draft always proposes token 0
    p = torch.tensor([a, 1 - a, 0.0, 0.0])  # the target accepts it with probability a
    gen = torch.Generator().manual_seed(0)
    target = p.expand(n, k + 1, v)
    accepted, _ = verify_draft(target, torch.zeros(n, k, dtype=torch.long), torch.full((n,), k),
                               q.expand(n, k, v), torch.rand(n, k, generator=gen), torch.rand(n, generator=gen))
    tokens = accepted.double() + 1
    assert abs(tokens.mean().item() - expected_tokens_per_pass(a, k)) < 4 * tokens.std().item() / n**0.5


def test_expected_speedup_from_costs():
    a, k = 0.8, 4
    e = expected_tokens_per_pass(a, k)
    assert expected_speedup(a, k, c=0.0) == pytest.approx(e)  # free drafts: every pass is E tokens
    # A draft step costing 5% of a target step, and a verify pass costing 1.5 steps: time per pass is
    # 4 * 0.05 + 1.5 = 1.7 steps for E tokens, against 1 step per token without speculation.
    assert expected_speedup(a, k, c=0.05, verify_cost=1.5) == pytest.approx(e / 1.7)
    assert expected_speedup(0.0, k, c=0.1) < 1.0  # drafts that are never accepted only cost
