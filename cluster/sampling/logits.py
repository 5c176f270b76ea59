"""Logits -> probabilities, applied identically to target (p) and draft (q) so the acceptance rule stays exact.

The order is vLLM's: logit bias and min_tokens (EOS held off), then repetition / frequency / presence
penalties, then temperature, top-k and top-p. Greedy rows are the argmax of the adjusted logits, as a
one-hot p. Penalties and min_tokens depend on the tokens before each position, so a verify pass over a
draft applies them position by position, with the draft's own earlier tokens counted (`TokenHistory`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as tensors on the logits' device. Built once per forward."""

    temperature: torch.Tensor  # [B] float; 0 = greedy
    top_k: torch.Tensor  # [B] long; 0 = off
    top_p: torch.Tensor  # [B] float; 1 = off
    logit_bias: torch.Tensor | None = None  # [B, V] added to the logits; None: no row has a bias
    # Known on the host when built, so a pass never waits on the device to branch:
    all_greedy: bool = False
    any_greedy: bool = False
    any_filter: bool = True

    @staticmethod
    def make(temperature, top_k=None, top_p=None, logit_bias=None, device="cpu") -> SamplingTensors:
        t = torch.as_tensor(temperature, dtype=torch.float32).reshape(-1)
        k = (torch.zeros_like(t, dtype=torch.long) if top_k is None else torch.as_tensor(top_k)).long().reshape(-1)
        p = (torch.ones_like(t) if top_p is None else torch.as_tensor(top_p, dtype=torch.float32)).reshape(-1)
        greedy = t == 0
        return SamplingTensors(t.to(device), k.to(device), p.to(device), logit_bias, bool(greedy.all()),
                               bool(greedy.any()), bool(((k > 0) | (p < 1)).any()))

    @staticmethod
    def from_params(params: list, vocab: int, device) -> SamplingTensors:
        """From validated SamplingParams (top_k is clamped to the vocabulary there; clamped again here)."""
        st = SamplingTensors.make([p.temperature for p in params], [min(p.top_k, vocab) for p in params],
                                  [p.top_p for p in params], device=device)
        if any(p.logit_bias for p in params):
            bias = torch.zeros(len(params), vocab, device=device)
            for row, p in enumerate(params):
                for token, value in p.logit_bias:
                    bias[row, token] += value
            st.logit_bias = bias
        return st

    def rows(self, index: torch.Tensor) -> SamplingTensors:
        """The rows in `index` (their host-side flags stay conservative: a subset of the same rows)."""
        return SamplingTensors(self.temperature[index], self.top_k[index], self.top_p[index],
                               None if self.logit_bias is None else self.logit_bias[index],
                               self.all_greedy, self.any_greedy, self.any_filter)


class TokenHistory:
    """What penalties and min_tokens need at each position: the tokens before it, counted per row.

    Build it from each row's tokens so far (prompt + output) and step it along a pass with `advance`,
    which appends one token per row (the draft token that precedes the next position). Pure torch.
    """

    def __init__(self, rows: list[tuple[list[int], int]], params: list, vocab: int, device,
                 suppress_ids: list[int] = ()):
        """rows: (tokens, num_prompt) per row; suppress_ids: held off while a row is below min_tokens."""
        self.device = device
        b = len(rows)
        self.presence = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device)
        self.repetition = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
        self.min_tokens = torch.tensor([p.min_tokens for p in params], device=device)
        self.output_len = torch.tensor([len(t) - n for t, n in rows], device=device)
        counts = torch.zeros(b, vocab)  # occurrences in the output (built on the host, then moved)
        seen = torch.zeros(b, vocab, dtype=torch.bool)  # in prompt or output
        for row, (tokens, num_prompt) in enumerate(rows):
            out = torch.tensor(tokens[num_prompt:], dtype=torch.long)
            if len(out):
                counts[row] += torch.bincount(out, minlength=vocab)[:vocab].float()
            if tokens:
                seen[row, torch.tensor(tokens, dtype=torch.long)] = True
        self.counts, self.seen = counts.to(device), seen.to(device)
        self.suppress = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
        self.holds_off = any(p.min_tokens for p in params)  # known on the host: no device sync to branch

    def apply(self, logits: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Adjust logits [b, V] at the current position, for all rows or the rows in `index`."""
        sel = slice(None) if index is None else index
        counts, seen = self.counts[sel], self.seen[sel]
        rep = self.repetition[sel].unsqueeze(-1)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        logits = logits - self.frequency[sel].unsqueeze(-1) * counts
        logits = logits - self.presence[sel].unsqueeze(-1) * (counts > 0).float()
        below = (self.output_len[sel] < self.min_tokens[sel]).unsqueeze(-1)
        if len(self.suppress) and self.holds_off:
            hold = torch.zeros_like(seen)
            hold[:, self.suppress] = True
            logits = logits.masked_fill(below & hold, float("-inf"))
        return logits

    def advance(self, tokens: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Append one token per row (or per row in `index`); a negative token appends nothing."""
        rows = torch.arange(len(self.counts), device=self.device) if index is None else index
        real = tokens >= 0
        tok = tokens.clamp(min=0)
        self.counts.index_put_((rows, tok), real.float(), accumulate=True)
        self.seen[rows, tok] = self.seen[rows, tok] | real
        self.output_len.index_put_((rows,), real.long(), accumulate=True)


def adjust_logits(logits: torch.Tensor, st: SamplingTensors, history: TokenHistory | None = None,
                  steps: torch.Tensor | None = None) -> torch.Tensor:
    """Bias, min_tokens and penalties on logits [B, V] or [B, T, V]. For [B, T, V] with a history,
    `steps` [B, T-1] holds the token that follows each position (a draft), counted for the next one."""
    logits = logits.float()
    if st.logit_bias is not None:
        logits = logits + (st.logit_bias if logits.dim() == 2 else st.logit_bias.unsqueeze(1))
    if history is None:
        return logits
    if logits.dim() == 2:
        return history.apply(logits)
    out = []
    for t in range(logits.shape[1]):
        out.append(history.apply(logits[:, t]))
        if t + 1 < logits.shape[1]:
            history.advance(steps[:, t])
    return torch.stack(out, 1)


def probs_from_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Adjusted logits [B, ..., V] -> probabilities. Greedy rows give a one-hot argmax (greedy decoding is
    the sampling rule with one-hot p); top_k == 0 and top_p == 1 switch those filters off."""
    extra = (1,) * (logits.dim() - 2)  # broadcast per-row params over middle (position) dims
    greedy = (st.temperature == 0).view(-1, *extra, 1)
    if st.all_greedy:  # the common serving case: skip softmax and filters entirely
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    t = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature)).view(-1, *extra, 1)
    scaled = logits / t
    if st.any_filter:
        scaled = _filter_top_k_top_p(scaled, st.top_k.view(-1, *extra, 1), st.top_p.view(-1, *extra, 1))
    probs = torch.softmax(scaled, dim=-1)
    if st.any_greedy:
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy, one_hot, probs)
    return probs


def process_logits(logits: torch.Tensor, st: SamplingTensors, history: TokenHistory | None = None,
                   steps: torch.Tensor | None = None) -> torch.Tensor:
    """adjust_logits then probs_from_logits: the whole processing of one side (p or q)."""
    return probs_from_logits(adjust_logits(logits, st, history, steps), st)


def logprobs_from_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Log-probabilities reported to clients: the adjusted logits at the request's temperature (1 for
    greedy), before top-k / top-p truncation."""
    extra = (1,) * (logits.dim() - 2)
    t = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature)).view(-1, *extra, 1)
    return torch.log_softmax(logits / t, dim=-1)


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    drop = (top_k > 0) & (rank >= top_k)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it is >= top_p.
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop = drop | (mass_before >= top_p)
    drop[..., 0] = False  # the most likely token always survives
    return scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token per row of probs [..., V] from uniforms u [...] in [0, 1).

    Taking the uniforms as input keeps this a pure function: the caller owns the per-request RNG.
    """
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:]
    idx = torch.searchsorted(cdf, (u.to(probs.device).unsqueeze(-1) * total).contiguous(), right=True).squeeze(-1)
    # Guard the float edge (u*total == total) and never return a zero-probability token.
    idx = idx.clamp_(max=probs.shape[-1] - 1)
    bad = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0
    return torch.where(bad, probs.argmax(-1), idx)
