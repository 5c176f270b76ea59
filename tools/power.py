"""Power of the pure acceptance-rule test (tests/unit/test_acceptance.py) against named mutants,
computed exactly: each mutant's output distribution at each position, the noncentral chi-square
noncentrality of the test's N trials, and the probability of rejecting at its alpha.

    python -m tools.power
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chi2, ncx2

from tests.unit.test_acceptance import BONUS, DRAFTS, N, P1, P2

ALPHA = 1e-4


def residual(p, q):
    r = np.clip(p - q, 0, None)
    return r / r.sum() if r.sum() > 0 else p


def wrong_residual(p, q):
    """The mutant: 5% of the residual's mass misplaced (0.95 r + 0.05 uniform over p's support)."""
    support = (p > 0).astype(float)
    return 0.95 * residual(p, q) + 0.05 * support / support.sum()


def emitted(p, q, res):
    """Distribution of the token emitted at a drafted position: accepted draft or residual sample."""
    accept = np.minimum(p, q)
    return accept + (1 - accept.sum()) * res(p, q), accept.sum()


def power(expected, observed_dist, n):
    keep = expected > 0
    lam = n * (((observed_dist - expected) ** 2)[keep] / expected[keep]).sum()
    df = keep.sum() - 1
    return ncx2.sf(chi2.isf(ALPHA, df), df, lam) if lam > 0 else ALPHA


def main() -> None:
    print("draft | position | trials reaching it | mutant | power")
    for name, (q1, q2) in sorted(DRAFTS.items()):
        p1, p2, bonus, q1, q2 = (np.asarray(t, dtype=float) for t in (P1, P2, BONUS, q1, q2))
        _, a1 = emitted(p1, q1, residual)
        _, a2 = emitted(p2, q2, residual)
        for pos, p, q, n in ((0, p1, q1, N), (1, p2, q2, N * a1)):
            mutant, _ = emitted(p, q, wrong_residual)
            print(f"{name} | {pos} | {n:.0f} | residual 5% wrong | {power(p, mutant, n):.3f}")
        n_bonus = N * a1 * a2
        if n_bonus >= 1:  # the bonus sampled from the residual of the last draft position instead of p
            print(f"{name} | 2 (bonus) | {n_bonus:.0f} | bonus from residual | "
                  f"{power(bonus, residual(bonus, q2), n_bonus):.3f}")


if __name__ == "__main__":
    main()
