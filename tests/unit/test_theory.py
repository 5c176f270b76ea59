import pytest

from cluster.sampling.theory import expected_speedup, expected_tokens_per_pass


def test_expected_tokens_limits():
    assert expected_tokens_per_pass(0.0, 4) == 1.0
    assert expected_tokens_per_pass(1.0, 4) == 5.0
    assert expected_tokens_per_pass(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_expected_speedup_matches_paper_formula():
    a, k, c = 0.8, 4, 0.05
    assert expected_speedup(a, k, c) == pytest.approx((1 - a ** (k + 1)) / ((1 - a) * (c * k + 1)))
    # A verify pass that costs more than one step lowers the ceiling proportionally.
    assert expected_speedup(a, k, c, verify_cost=1.5) < expected_speedup(a, k, c)
