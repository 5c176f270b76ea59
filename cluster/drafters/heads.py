"""Parallel heads (Medusa-1, Cai et al. 2024): no draft model runs. K small heads read the target's last
hidden state h, the one whose logits chose the pending token, and guess the K tokens after it at once:

    head_i(h) = LMHead(h + SiLU(W_i h + b_i))      the token i places after the pending one (i = 1..K)

The LM head is the target's own (shared in process, loaded with the target's weights in a draft actor);
only W_i, b_i are trained (tools/train_heads.py, by self-distillation). The proposal is a token tree: the
likeliest paths through each head's top-k candidates (scored by the product of the heads' probabilities)
that fit the budget. Candidates are deterministic (q = None): exact under both rules, since the target
takes the child equal to its own token (coupled) or rejects one-hot candidates one by one (rejection).
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cluster.core.messages import Proposal
from cluster.drafters.base import Drafter, DraftRequest

WEIGHTS, META = "heads.safetensors", "config.json"


class ParallelHeads(torch.nn.Module):
    """K residual SiLU heads over a frozen LM head: forward(h [N, H]) -> log-probabilities [K, N, V]."""

    def __init__(self, num_heads: int, hidden_size: int):
        super().__init__()
        # Zero init: every head starts as the LM head itself (Medusa's choice), i.e. "the next token again".
        self.weight = torch.nn.Parameter(torch.zeros(num_heads, hidden_size, hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(num_heads, hidden_size))

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [K, N, H]: each head's input to the LM head."""
        return h.unsqueeze(0) + F.silu(torch.einsum("nh,kgh->kng", h, self.weight) + self.bias.unsqueeze(1))

    def logits(self, h: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """[K, N, V] logits through the LM head weight lm_head [V, H] (one matrix product for all heads)."""
        from cluster.models.lean import _linear  # the small-batch products: K x N rows read the head once

        z = self.residual(h)
        k, n, hidden = z.shape
        return _linear(z.reshape(k * n, hidden).to(lm_head.dtype), lm_head).float().view(k, n, -1)


def save_heads(directory: str | Path, heads: ParallelHeads, meta: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"weight": heads.weight.detach().contiguous(), "bias": heads.bias.detach().contiguous()},
              str(directory / WEIGHTS))
    (directory / META).write_text(json.dumps({"num_heads": heads.num_heads, "hidden_size": heads.weight.shape[1],
                                              **meta}, indent=2))


def load_heads(directory: str | Path) -> tuple[ParallelHeads, dict]:
    directory = Path(directory)
    tensors = load_file(str(directory / WEIGHTS))
    meta = json.loads((directory / META).read_text()) if (directory / META).is_file() else {}
    heads = ParallelHeads(*tensors["weight"].shape[:2])
    heads.load_state_dict(tensors)
    return heads.eval(), meta


def best_paths(logprobs: list[list[tuple[int, float]]], budget: int) -> Proposal:
    """A tree of at most `budget` nodes from per-depth candidates [(token, log p), ...]: the likeliest
    paths first (a path's score is the sum of its nodes' log-probabilities, so a parent always scores at
    least its children and comes first)."""
    tokens, parents = [], []
    heap = [(-lp, 0, token, -1) for token, lp in logprobs[0]] if logprobs else []
    heapq.heapify(heap)
    while heap and len(tokens) < budget:
        neg, depth, token, parent = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(token)
        parents.append(parent)
        if depth + 1 < len(logprobs):
            for child, lp in logprobs[depth + 1]:
                heapq.heappush(heap, (neg - lp, depth + 1, child, node))
    return Proposal(tokens, parents)


class HeadsDrafter(Drafter):
    name = "heads"

    def __init__(self, heads: ParallelHeads, lm_head: torch.Tensor, top_k: int = 3):
        self.heads = heads.to(device=lm_head.device, dtype=torch.float32)
        self.lm_head = lm_head.detach()
        self.top_k = top_k

    @torch.inference_mode()
    def propose(self, batch: list[DraftRequest]) -> list[Proposal]:
        out = [Proposal() for _ in batch]
        rows = [i for i, r in enumerate(batch) if r.hidden is not None]  # none yet: nothing to draft from
        if not rows:
            return out
        h = torch.stack([torch.as_tensor(batch[i].hidden) for i in rows]).to(self.lm_head.device, torch.float32)
        top = torch.log_softmax(self.heads.logits(h, self.lm_head), -1).topk(self.top_k, dim=-1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()  # [K][R][top_k]
        for r, i in enumerate(rows):
            depth = min(self.heads.num_heads, batch[i].budget)
            candidates = [list(zip(indices[k][r], values[k][r])) for k in range(depth)]
            out[i] = best_paths(candidates, batch[i].budget)
        return out


def build(section, context) -> HeadsDrafter:
    from cluster.models.loader import load_model

    heads, meta = load_heads(section.path)
    source = context.target_model if context.target_model is not None else load_model(context.target, context.device)
    lm_head = source.get_output_embeddings().weight
    if lm_head.shape[1] != heads.weight.shape[1]:
        raise ValueError(f"drafter.heads: heads of width {heads.weight.shape[1]} for a target of width "
                         f"{lm_head.shape[1]} ({section.path} was trained for {meta.get('target', 'another model')})")
    if lm_head.shape[0] != context.target_vocab:
        raise ValueError(f"drafter.heads: LM head vocabulary {lm_head.shape[0]} != target's {context.target_vocab}")
    return HeadsDrafter(heads, lm_head, section.top_k)
