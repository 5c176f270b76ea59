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
