"""Per-request draft length from recent acceptance (pure)."""


def next_k(k: int, proposed: int, accepted: int, k_min: int, k_max: int) -> int:
    """All proposed accepted: draft longer (+2); any rejected: shorter (-1). HF's 'heuristic' schedule,
    which tracks the acceptance run length cheaply. A step that proposed nothing leaves K alone."""
    if proposed == 0:
        return k
    if accepted == proposed:
        return min(k + 2, k_max)
    return max(k - 1, k_min)
