"""Per-request draft length from recent acceptance (pure)."""


def next_k(k: int, proposed: int, accepted: int, k_min: int, k_max: int) -> int:
    """All proposed accepted: draft longer (+2); any rejected: shorter (-1). HF's 'heuristic' schedule,
    which tracks the acceptance run length cheaply. A step that proposed nothing leaves K alone."""
    if proposed == 0:
        return k
    if accepted == proposed:
        return min(k + 2, k_max)
    return max(k - 1, k_min)


def fit_budget(ks: list[int], verify_token_budget: int) -> list[int]:
    """Shrink per-request draft lengths so one verify pass carries at most `verify_token_budget` tokens
    (one pending token per request plus its drafts), taking from the longest first. Past the hardware's
    memory-bound knee extra draft tokens cost more than they save; a budget of 0 means unlimited."""
    if verify_token_budget <= 0:
        return list(ks)
    budget = max(0, verify_token_budget - len(ks))
    if sum(ks) <= budget:
        return list(ks)
    ks = list(ks)
    total = sum(ks)
    while total > budget:
        i = max(range(len(ks)), key=ks.__getitem__)
        ks[i] -= 1
        total -= 1
    return ks
