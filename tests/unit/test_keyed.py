"""Keyed randomness: a pure function of (seed, position, purpose), uniform, and independent across keys."""

import torch
from scipy.stats import chisquare, kstest

from cluster.sampling import keyed


def test_draws_depend_only_on_their_key():
    assert keyed.uniform(7, 3, keyed.ACCEPT) == keyed.uniform(7, 3, keyed.ACCEPT)
    values = {keyed.uniform(7, 3, purpose) for purpose in (keyed.ACCEPT, keyed.RESIDUAL, keyed.DRAFT)}
    values |= {keyed.uniform(8, 3, keyed.ACCEPT), keyed.uniform(7, 4, keyed.ACCEPT), keyed.uniform(7, 3, keyed.ACCEPT, 1)}
    assert len(values) == 6
    assert torch.equal(keyed.race_noise(5, 2, 50), keyed.race_noise(5, 2, 50))
    assert not torch.equal(keyed.race_noise(5, 2, 50), keyed.race_noise(5, 3, 50))


def test_uniforms_are_uniform_across_seeds_and_positions():
    u = [keyed.uniform(s, p, keyed.ACCEPT) for s in range(200) for p in range(100)]
    assert kstest(u, "uniform").pvalue > 1e-3
    assert abs(torch.tensor(u).mean().item() - 0.5) < 0.01


def test_the_race_samples_p():
    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05], dtype=torch.float64)
    wins = torch.tensor([int((p / keyed.race_noise(s, 0, 5)).argmax()) for s in range(20000)])
    counts = torch.bincount(wins, minlength=5)
    assert counts[1] == 0
    keep = p > 0
    assert chisquare(counts[keep].numpy(), (p[keep] * 20000).numpy()).pvalue > 1e-4


def test_keys_are_pinned_across_versions():
    """A seeded request must give the same tokens on every replica, during a rolling upgrade too: the key
    function is part of the contract, so its values are pinned (a change here is a breaking change)."""
    cases = [(0, 0, 1, 0), (2**64 - 1, 7, 2, 0), (12345, 3, 4, 2)]
    assert [keyed.key(*c) for c in cases] == [6348422647138760783, 2668869219881535327, 6059243796867456059]
    assert keyed.uniform(42, 5, keyed.ACCEPT) == 0.08382235859971865
    assert keyed.key(0, 0, 1) == keyed.key(0, 0, 1, 0)  # the default branch is branch 0
