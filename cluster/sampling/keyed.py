"""Keyed randomness: every random draw is a pure function of (request seed, output position, purpose),
never of the batch, the draft length or the worker. So a seeded request gives the same tokens alone or
in any batch, with any K, and after its worker is replaced.

Purposes keep draws independent: ACCEPT and RESIDUAL feed the rejection rule; DRAFT feeds a drafter's
own sampling there; RACE is the exponential race of the coupled rule (acceptance.py), shared on purpose
by the target and the drafter so that their choices agree as often as possible.
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
ACCEPT, RESIDUAL, DRAFT, RACE = 1, 2, 3, 4


def key(seed: int, position: int, purpose: int, branch: int = 0) -> int:
    """A 64-bit key mixing its inputs (splitmix64 finaliser over each, chained)."""
    z = seed & MASK64
    for part in (position, purpose, branch):
        z = _mix((z ^ _mix(part + 0x9E3779B97F4A7C15)) + 0x9E3779B97F4A7C15)
    return z


def uniform(seed: int, position: int, purpose: int, branch: int = 0) -> float:
    """A uniform in [0, 1) with 53 random bits."""
    return (key(seed, position, purpose, branch) >> 11) * (1.0 / (1 << 53))


def race_noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """Exponential(1) variates E_v, one per token, for the race argmax_v p_v / E_v (a sample from p).
    Generated on the CPU from the key, so every device and every worker sees the same values."""
    gen = torch.Generator().manual_seed(key(seed, position, RACE))
    u = torch.rand(vocab, generator=gen, dtype=torch.float64)
    return -torch.log1p(-u)  # u in [0, 1): 1 - u in (0, 1], never log(0)


def _mix(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)
