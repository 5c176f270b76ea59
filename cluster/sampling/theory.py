"""Expected gains of speculative decoding (Leviathan, Kalman, Matias 2023), DESIGN.md section 1."""


def expected_tokens_per_pass(a: float, k: int) -> float:
    """E = (1 - a^(K+1)) / (1 - a): tokens emitted per target pass with i.i.d. acceptance a."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def expected_speedup(a: float, k: int, c: float, verify_cost: float = 1.0) -> float:
    """S = E / (c K + v): speed-up over target-only decoding.

    c is draft-step time / target-step time. v is the cost of a (K+1)-token verify pass relative to a
    one-token target step: 1 in the paper's memory-bound model; measured (> 1) on a compute-bound CPU.
    """
    return expected_tokens_per_pass(a, k) / (c * k + verify_cost)
