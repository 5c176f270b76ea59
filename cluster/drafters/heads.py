"""Draft heads on the target's last hidden state h (the one whose logits chose the pending token): no
draft model runs. Two architectures, named in the weights' config.json (`arch`):

- `medusa` (Medusa-1, Cai et al. 2024): K parallel heads guess the K tokens after the pending one at once,
      head_i(h) = LMHead(h + SiLU(W_i h + b_i)).
  A head never sees the pending token nor the guesses before its own, which is what a 135M model's h
  cannot make up for (held-out top-1 of the second head 0.27).
- `hydra` (sequentially dependent heads, Ankner et al. 2024; EAGLE's feature recurrence without its
  attention): one small step network, shared by every depth, carries a state from h through the tokens
  drafted so far,
      s_0 = h,  s_j = s_{j-1} + Down(SiLU(Up([rms(s_{j-1}) * a; rms(E x_j) * b]))),  logits_j = LMHead(s_j),
  where x_1 is the pending token and x_{j+1} the guess drawn from logits_j. It is trained to regress the
  target's own next hidden state and to predict its next token (tools/train_heads.py), over a
  frequency-ranked subset of the vocabulary (FR-Spec: the draft proposes only those tokens; the output
  does not change, every token is verified).

The LM head and the embedding are the target's own (shared in process, loaded with the target's weights
in a draft actor); only the heads are trained. The proposal is a token tree of the likeliest paths (a
path's score is the sum of its nodes' log-probabilities) that fit the budget. Candidates are
deterministic (q = None): exact under both rules, since the target takes the child equal to its own
token (coupled) or rejects one-hot candidates one by one (rejection).
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

    arch = "medusa"

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


class SequentialHeads(torch.nn.Module):
    """Hydra-style heads: one residual step network shared by every depth (see the module docstring).
    `vocab` holds the token ids the draft may propose, most frequent first; `depth` how far it was
    trained to guess (the drafter guesses no further)."""

    arch = "hydra"

    def __init__(self, hidden_size: int, vocab: torch.Tensor, depth: int, inner: int | None = None):
        super().__init__()
        inner = inner or 2 * hidden_size
        self.scale_state = torch.nn.Parameter(torch.ones(hidden_size))
        self.scale_token = torch.nn.Parameter(torch.ones(hidden_size))
        self.up = torch.nn.Linear(2 * hidden_size, inner)
        self.down = torch.nn.Linear(inner, hidden_size)
        # Zero init: s_1 = h, i.e. every head starts as "the next token again", as Medusa's do.
        torch.nn.init.zeros_(self.down.weight)
        torch.nn.init.zeros_(self.down.bias)
        self.register_buffer("vocab", vocab.to(torch.long).clone())
        self.depth = depth

    @property
    def num_heads(self) -> int:
        return self.depth

    def step(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """State [N, H] and the embedding [N, H] of the token it is followed by -> the next state [N, H]."""
        x = torch.cat([F.rms_norm(s, s.shape[-1:]) * self.scale_state,
                       F.rms_norm(e, e.shape[-1:]) * self.scale_token], -1)
        return s + self.down(F.silu(self.up(x)))


def save_heads(directory: str | Path, heads: ParallelHeads | SequentialHeads, meta: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous() for name, t in heads.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS))
    shape = ({"hidden_size": heads.up.in_features // 2, "inner": heads.up.out_features}
             if isinstance(heads, SequentialHeads) else {"hidden_size": heads.weight.shape[1]})
    (directory / META).write_text(json.dumps({**meta, "arch": heads.arch, "num_heads": heads.num_heads,
                                              **shape}, indent=2))


def load_heads(directory: str | Path) -> tuple[ParallelHeads | SequentialHeads, dict]:
    directory = Path(directory)
    tensors = load_file(str(directory / WEIGHTS))
    meta = json.loads((directory / META).read_text()) if (directory / META).is_file() else {}
    if meta.get("arch", "medusa") == "hydra":
        heads = SequentialHeads(meta["hidden_size"], tensors["vocab"], meta["num_heads"], meta["inner"])
    else:
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


def _with_hidden(batch: list[DraftRequest], device, dtype) -> tuple[list[Proposal], list[int], torch.Tensor | None]:
    """(an empty proposal per request, the requests that carry a hidden state, those states stacked [R, H]).
    A request without one (none returned yet) gets nothing drafted."""
    out = [Proposal() for _ in batch]
    rows = [i for i, r in enumerate(batch) if r.hidden is not None]
    if not rows:
        return out, rows, None
    return out, rows, torch.stack([torch.as_tensor(batch[i].hidden) for i in rows]).to(device, dtype)


class HeadsDrafter(Drafter):
    name = "heads"

    def __init__(self, heads: ParallelHeads, lm_head: torch.Tensor, top_k: int = 3):
        self.heads = heads.to(device=lm_head.device, dtype=torch.float32)
        self.lm_head = lm_head.detach()
        self.top_k = top_k

    @torch.inference_mode()
    def propose(self, batch: list[DraftRequest]) -> list[Proposal]:
        out, rows, h = _with_hidden(batch, self.lm_head.device, torch.float32)
        if not rows:
            return out
        top = torch.log_softmax(self.heads.logits(h, self.lm_head), -1).topk(self.top_k, dim=-1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()  # [K][R][top_k]
        for r, i in enumerate(rows):
            depth = min(self.heads.num_heads, batch[i].budget)
            candidates = [list(zip(indices[k][r], values[k][r])) for k in range(depth)]
            out[i] = best_paths(candidates, batch[i].budget)
        return out


def _tree(nodes: list[tuple[float, int, int, int]], budget: int) -> Proposal:
    """The `budget` best of nodes [(score, depth, token, parent index)] as a Proposal. A node scores at
    most its parent (log-probabilities add), and ties go to the shallower, so a parent always comes first."""
    order = sorted(range(len(nodes)), key=lambda n: (-nodes[n][0], nodes[n][1]))[:budget]
    new = {}
    tokens, parents = [], []
    for n in order:
        _, _, token, parent = nodes[n]
        new[n] = len(tokens)
        tokens.append(token)
        parents.append(-1 if parent < 0 else new[parent])
    return Proposal(tokens, parents)


class SequentialHeadsDrafter(Drafter):
    """Beam over the step network: each depth expands every row's `top_k` best paths so far by their
    `top_k` likeliest next tokens, in one batched step for every row; the tree is the best `budget` nodes."""

    name = "heads"

    def __init__(self, heads: SequentialHeads, lm_head: torch.Tensor, embedding: torch.Tensor, top_k: int = 3,
                 vocab: int = 0):
        # In the target's dtype: a few rows through the step network's fp32 products took 4.7 ms of a
        # 9.8 ms call here (fp32 addmm and mm are slow at 1-3 rows); in bf16 they stream half the bytes.
        self.heads = heads.to(device=lm_head.device, dtype=lm_head.dtype)
        if vocab:  # the most frequent first: a prefix is a smaller frequency-ranked head, read once per depth
            self.heads.vocab = self.heads.vocab[:vocab]
        self.rows = lm_head.detach()[self.heads.vocab].contiguous()  # the proposable rows, in the head's dtype
        self.embedding = embedding.detach()
        self.top_k = top_k

    @torch.inference_mode()
    def propose(self, batch: list[DraftRequest]) -> list[Proposal]:
        device = self.rows.device
        out, rows, s = _with_hidden(batch, device, self.rows.dtype)
        if not rows:
            return out
        from cluster.models.lean import _linear  # the small-batch products: every frontier row reads the head once

        depth = {i: min(self.heads.depth, batch[i].budget) for i in rows}
        nodes = {i: [] for i in rows}  # per row: (score, depth, token, parent)
        tokens = torch.tensor([batch[i].tokens[-1] for i in rows], device=device)
        frontier = [(i, 0.0, -1) for i in rows]  # per state row: (request, path score, node it extends)
        for d in range(max(depth.values())):
            s = self.heads.step(s, self.embedding[tokens].to(s.dtype))
            logits = _linear(s, self.rows).float()
            top = torch.log_softmax(logits, -1).topk(self.top_k, dim=-1)
            values, ids = top.values.cpu().tolist(), self.heads.vocab[top.indices.cpu()].tolist()
            grown = {i: [] for i in rows}  # per request: (score, state row, child token, node id)
            for f, (i, score, parent) in enumerate(frontier):
                for lp, token in zip(values[f], ids[f]):
                    nodes[i].append((score + lp, d, token, parent))
                    grown[i].append((score + lp, f, token, len(nodes[i]) - 1))
            frontier, keep, next_tokens = [], [], []
            for i in rows:
                if d + 1 < depth[i]:
                    for score, f, token, node in sorted(grown[i], reverse=True)[: self.top_k]:
                        frontier.append((i, score, node))
                        keep.append(f)
                        next_tokens.append(token)
            if not frontier:
                break
            s = s[torch.tensor(keep, device=device)]
            tokens = torch.tensor(next_tokens, device=device)
        for i in rows:
            out[i] = _tree(nodes[i], batch[i].budget)
        return out


def build(section, context) -> HeadsDrafter | SequentialHeadsDrafter:
    from cluster.models.loader import load_model

    heads, meta = load_heads(section.path)
    source = context.target_model if context.target_model is not None else load_model(context.target, context.device)
    lm_head = source.get_output_embeddings().weight
    width = meta.get("hidden_size", lm_head.shape[1])
    if lm_head.shape[1] != width:
        raise ValueError(f"drafter.heads: heads of width {width} for a target of width "
                         f"{lm_head.shape[1]} ({section.path} was trained for {meta.get('target', 'another model')})")
    if lm_head.shape[0] != context.target_vocab:
        raise ValueError(f"drafter.heads: LM head vocabulary {lm_head.shape[0]} != target's {context.target_vocab}")
    if isinstance(heads, SequentialHeads):
        if int(heads.vocab.max()) >= lm_head.shape[0]:
            raise ValueError(f"drafter.heads: {section.path} proposes token ids past the target's vocabulary")
        return SequentialHeadsDrafter(heads, lm_head, source.get_input_embeddings().weight, section.top_k,
                                      section.vocab)
    return HeadsDrafter(heads, lm_head, section.top_k)
