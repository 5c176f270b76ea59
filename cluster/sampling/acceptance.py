"""The speculative acceptance rule (Leviathan et al. 2023; Chen et al. 2023), batched over requests.

Names follow the paper: p = target distribution, q = draft distribution, x = draft token.
For each request, draft tokens x_1..x_k are accepted left to right while u_i < p_i(x_i) / q_i(x_i);
at the first rejection the next token is sampled from norm(max(0, p_i - q_i)) (the residual); if all
k are accepted it is sampled from p_(k+1) (the bonus token). Greedy is the same rule with one-hot p,
and a drafter without a distribution (n-gram lookup) has one-hot q. Output is distributed exactly as p.
"""

from __future__ import annotations

import torch

from cluster.sampling import keyed
from cluster.sampling.logits import sample_from


def verify_draft(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
    u_accept: torch.Tensor,
    u_sample: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide how many draft tokens each request keeps and which token follows them.

    target_probs [B, K+1, V]: processed p at each draft position plus the bonus position.
    draft_tokens [B, K]: proposals, padded where a request drafted fewer than K (num_draft [B]).
    draft_probs  [B, K, V] or None: processed q; None means every draft is deterministic (one-hot).
    u_accept [B, K], u_sample [B]: uniforms in [0, 1) from each request's own generator.
    Returns (num_accepted [B], next_token [B]).
    """
    batch, k = draft_tokens.shape
    rows = torch.arange(batch, device=draft_tokens.device)
    p_x = target_probs[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
    else:
        q_x = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    valid = torch.arange(k, device=draft_tokens.device) < num_draft.unsqueeze(-1)
    accepted = (u_accept * q_x < p_x) & valid  # u < p/q, written without dividing by q
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)

    dist = target_probs[rows, num_accepted]  # bonus: p at the first position not accepted
    rejected = num_accepted < num_draft
    if k:  # computed for every row (no host sync to branch on), used where a draft was rejected
        at = num_accepted.clamp(max=k - 1)
        if draft_probs is None:
            residual = dist.scatter(-1, draft_tokens[rows, at].unsqueeze(-1), 0.0)
        else:
            residual = (dist - draft_probs[rows, at]).clamp_min(0.0)
        # A residual with no mass can only be reached through float error (p == q); fall back to p.
        has_mass = residual.sum(-1, keepdim=True) > 0
        residual = torch.where(has_mass, residual, dist)
        dist = torch.where(rejected.unsqueeze(-1), residual, dist)
    return num_accepted, sample_from(dist, u_sample)


# --- The coupled rule: drafter-invariant, any number of candidates ---------------------------------------
# At each position the target's token is t* = argmax_v p_v / E_v, with Exponential(1) variates E keyed by
# (seed, position) (keyed.race_noise): an exact sample from p (the exponential race, equivalently the
# Gumbel-max trick). A draft token is accepted iff it equals t*, so every emitted token is t*, whatever
# was drafted: output is target-only sampling with the same seed, token for token, for any drafter, K or
# tree. A drafter that samples its own tokens as argmax_v q_v / E_v with the same E agrees with t* with
# probability at least (1 - TV(p, q)) / (1 + TV(p, q)) (Daliri et al. 2024). Greedy is E = 1 (argmax p).


def coupled_choice(probs: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """t* per row: argmax p / E over the last dim (argmax p where noise is None)."""
    if noise is None:
        return probs.argmax(-1)
    return (probs.double() / noise.to(probs.device)).argmax(-1)


def accept_chain_coupled(chosen: torch.Tensor, draft_tokens: torch.Tensor,
                         num_draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chains: chosen [B, K+1] (t* at each position), draft_tokens [B, K] padded, num_draft [B].
    Returns (num_accepted [B], next_token [B]): drafts are kept while they equal t*."""
    k = draft_tokens.shape[1]
    valid = torch.arange(k, device=draft_tokens.device) < num_draft.unsqueeze(-1)
    agree = (draft_tokens == chosen[:, :k]) & valid
    num_accepted = agree.long().cumprod(dim=1).sum(dim=1)
    return num_accepted, chosen.gather(1, num_accepted.unsqueeze(1)).squeeze(1)


def walk_tree(tokens: list[int], children: list[list[int]], chosen: list[int]) -> tuple[list[int], int]:
    """Trees: follow, from the root, the child whose token is the chosen token at its parent.
    chosen[0] is t* at the root, chosen[i + 1] at node i. Returns (accepted path, next token)."""
    path, at = [], 0
    while True:
        token = chosen[at]
        child = next((i for i in children[at] if tokens[i] == token), None)
        if child is None:
            return path, token
        path.append(child)
        at = child + 1


# --- Recursive rejection over sibling candidates (SpecInfer / SpecTr), for the rejection rule ----------

def recursive_rejection(p: torch.Tensor, candidates: list[tuple[int, torch.Tensor | None]],
                        u_accept: list[float], u_residual: float) -> tuple[int, int]:
    """Several candidates for one position, candidate j drawn independently from q_j (None: one-hot).
    Try them in order: accept x_j with probability min(1, r(x_j) / q_j(x_j)), where r starts as p and after
    each rejection becomes norm(max(0, r - q_j)); if all are rejected, sample from the last r. The emitted
    token is distributed as p. Returns (index of the accepted candidate or -1, token)."""
    r = p.double()
    for j, (x, q) in enumerate(candidates):
        q = torch.zeros_like(r).index_fill_(0, torch.tensor([x], device=r.device), 1.0) if q is None else q.double()
        if u_accept[j] * q[x] < r[x]:
            return j, x
        residual = (r - q).clamp_min(0.0)
        # No mass left can only come from float error (r == q, which always accepts): keep r.
        r = residual / residual.sum() if residual.sum() > 0 else r
    return -1, int(sample_from(r.unsqueeze(0), torch.tensor([u_residual], dtype=r.dtype))[0])


def keyed_choices(probs: torch.Tensor, seeds: list[int], positions: list[int], rule: str,
                  purpose: int) -> torch.Tensor:
    """One sampled token per row of probs [R, V], row r at output position positions[r] of a request seeded
    seeds[r] (the draws are the rows' own: batching changes nothing). coupled: the race with the noise the
    target and every drafter share, so their choices agree as often as possible. rejection: inverse-CDF
    with the uniform keyed by `purpose` (a drafter's DRAFT, the target's RESIDUAL), independent of the
    acceptance uniforms (a draft drawn with those would bias what is accepted)."""
    if rule == "coupled":
        noise = torch.stack([keyed.race_noise(s, p, probs.shape[-1]) for s, p in zip(seeds, positions)])
        return coupled_choice(probs, noise)
    u = torch.tensor([keyed.uniform(s, p, purpose) for s, p in zip(seeds, positions)], dtype=torch.float64)
    return sample_from(probs.double(), u)


def keyed_choice(probs: torch.Tensor, seed: int, position: int, rule: str, purpose: int) -> int:
    """keyed_choices for one row, probs [V]."""
    return int(keyed_choices(probs.unsqueeze(0), [seed], [position], rule, purpose)[0])


def draft_choices(q: torch.Tensor, seeds: list[int], positions: list[int], rule: str) -> torch.Tensor:
    """A sampling drafter's tokens, q [R, V]: keyed by the drafter's own purpose, never the target's."""
    return keyed_choices(q, seeds, positions, rule, keyed.DRAFT)
