"""The speculative acceptance rule (Leviathan et al. 2023; Chen et al. 2023), batched over requests.

Names follow the paper: p = target distribution, q = draft distribution, x = draft token.
For each request, draft tokens x_1..x_k are accepted left to right while u_i < p_i(x_i) / q_i(x_i);
at the first rejection the next token is sampled from norm(max(0, p_i - q_i)) (the residual); if all
k are accepted it is sampled from p_(k+1) (the bonus token). Greedy is the same rule with one-hot p,
and a drafter without a distribution (n-gram lookup) has one-hot q. Output is distributed exactly as p.
"""

from __future__ import annotations

import torch

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
    if bool(rejected.any()):
        at = num_accepted.clamp(max=max(k - 1, 0))
        if draft_probs is None:
            residual = dist.scatter(-1, draft_tokens[rows, at].unsqueeze(-1), 0.0)
        else:
            residual = (dist - draft_probs[rows, at]).clamp_min(0.0)
        # A residual with no mass can only be reached through float error (p == q); fall back to p.
        has_mass = residual.sum(-1, keepdim=True) > 0
        residual = torch.where(has_mass, residual, dist)
        dist = torch.where(rejected.unsqueeze(-1), residual, dist)
    return num_accepted, sample_from(dist, u_sample)
