"""The target side: a model, the KV caches of the sequences pinned to it, and the acceptance rule.

Verification happens here, next to the target's probabilities, so only token ids (and, for sampled
requests, the draft's q) travel to this worker, and only (accepted count, next token) travel back.

A pass is transactional: cache lengths and per-sequence state change only once the whole pass has
succeeded. So when a batched pass raises, the worker can retry each sequence alone and fail only the
one that raises (`Failure`); the others' results are exact and nothing is left half-applied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cluster.config import ModelConfig
from cluster.models.loader import load_model
from cluster.models.runner import ModelRunner
from cluster.requests import eos_ids
from cluster.sampling.acceptance import verify_draft
from cluster.sampling.logits import (
    SamplingTensors,
    TokenHistory,
    adjust_logits,
    logprobs_from_logits,
    probs_from_logits,
    sample_from,
)
from cluster.types import SamplingParams, TokenLogprob
from cluster.workers.isolation import Failure, isolated


@dataclass
class PrefillItem:
    seq_id: str
    tokens: list[int]  # prompt (new request) or prompt + output so far (resume after a failover)
    num_prompt: int
    params: SamplingParams
    seed: int
    resume: bool = False  # True: tokens[-1] was already emitted; cache the rest and sample nothing


@dataclass
class VerifyItem:
    seq_id: str
    draft: list[int]
    draft_probs: torch.Tensor | None = None  # [len(draft), V] processed q, None for a deterministic draft


@dataclass
class Emitted:
    """What one pass emitted for one sequence: `accepted` draft tokens, then `token` (the next one)."""

    accepted: int
    token: int | None  # None: a resumed sequence's prefill emits nothing
    logprobs: list[TokenLogprob] | None = None  # one per emitted token, when the request asked


@dataclass
class _TargetSeq:
    slot: int
    tokens: list[int]  # prompt + output; the last one is pending: emitted, not yet in the cache
    num_prompt: int
    params: SamplingParams
    generator: torch.Generator


class TargetWorker:
    def __init__(self, model_cfg: ModelConfig, num_slots: int, capacity: int, model: torch.nn.Module | None = None,
                 device: str = "cpu", extra_eos: tuple[int, ...] = ()):
        model = model if model is not None else load_model(model_cfg, device)
        self.runner = ModelRunner(model, num_slots, capacity)
        self.eos_ids = sorted(eos_ids(model) | set(extra_eos))  # held off below min_tokens
        self.seqs: dict[str, _TargetSeq] = {}
        self.busy_s = 0.0  # time spent in forward passes: utilisation = busy_s / wall time
        self.passes = 0

    # --- calls -----------------------------------------------------------------------------------
    def prefill(self, items: list[PrefillItem]) -> list[Emitted | Failure]:
        """Cache each sequence and sample its first token (nothing for resumed sequences)."""
        return self._timed(self._prefill, items)

    def verify(self, items: list[VerifyItem]) -> list[Emitted | Failure]:
        """One ragged forward over [pending] + draft per sequence; what each accepted and emits next."""
        return self._timed(self._verify, items)

    def verify_timed(self, items: list[VerifyItem]) -> tuple[list[Emitted | Failure], float]:
        """verify(), plus the seconds this worker computed: the router's overhead is the rest."""
        busy = self.busy_s
        return self.verify(items), self.busy_s - busy

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self.runner.cache.free(seq.slot)

    # --- passes ----------------------------------------------------------------------------------
    def _timed(self, run, items: list) -> list:
        start = time.perf_counter()
        try:
            return isolated(run, items)
        finally:
            self.busy_s += time.perf_counter() - start
            self.passes += 1

    def _prefill(self, items: list[PrefillItem]) -> list[Emitted]:
        for item in items:
            if item.seq_id in self.seqs:
                raise ValueError(f"sequence {item.seq_id} is already on this worker")
        new = {}
        try:
            for item in items:
                gen = torch.Generator().manual_seed(item.seed)
                new[item.seq_id] = _TargetSeq(self.runner.cache.allocate(), list(item.tokens), item.num_prompt,
                                              item.params, gen)
            feeds = [item.tokens[:-1] if item.resume else item.tokens for item in items]
            fresh = [i for i, f in enumerate(feeds) if f]  # a 1-token resume has nothing to cache
            out = [Emitted(0, None) for _ in items]
            if fresh:
                seqs = [new[items[i].seq_id] for i in fresh]
                lengths = [self.runner.cache.lengths[s.slot] for s in seqs]
                try:
                    logits = self.runner.forward([s.slot for s in seqs], [feeds[i] for i in fresh], last_only=True)
                    sampled = [i for i in fresh if not items[i].resume]
                    if sampled:
                        rows = [fresh.index(i) for i in sampled]
                        emitted = self._sample_first(logits[rows], [new[items[i].seq_id] for i in sampled])
                        for i, e in zip(sampled, emitted):
                            out[i] = e
                except Exception:
                    for s, length in zip(seqs, lengths):
                        self.runner.cache.truncate(s.slot, length)
                    raise
        except Exception:
            for s in new.values():
                self.runner.cache.free(s.slot)
            raise
        for item, e in zip(items, out):  # commit
            seq = self.seqs[item.seq_id] = new[item.seq_id]
            if e.token is not None:
                seq.tokens.append(e.token)
        return out

    def _sample_first(self, logits: torch.Tensor, seqs: list[_TargetSeq]) -> list[Emitted]:
        st, history = self._sampling([s.params for s in seqs], seqs, logits.device)
        adjusted = adjust_logits(logits, st, history)
        u = torch.stack([_uniforms(s, 1)[0] for s in seqs])
        tokens = sample_from(probs_from_logits(adjusted, st), u).tolist()
        logprobs = self._logprobs(adjusted.unsqueeze(1), st, seqs, [[t] for t in tokens])
        return [Emitted(0, t, lp) for t, lp in zip(tokens, logprobs)]

    def _verify(self, items: list[VerifyItem]) -> list[Emitted]:
        seqs = [self.seqs[item.seq_id] for item in items]
        slots = [s.slot for s in seqs]
        lengths = [self.runner.cache.lengths[slot] for slot in slots]
        try:
            logits = self.runner.forward(slots, [[s.tokens[-1]] + item.draft for s, item in zip(seqs, items)])
            results = self._accept(logits, seqs, items)
        except Exception:
            for slot, length in zip(slots, lengths):
                self.runner.cache.truncate(slot, length)
            raise
        for s, slot, length, item, r in zip(seqs, slots, lengths, items, results):  # commit
            self.runner.cache.truncate(slot, length + 1 + r.accepted)  # pending + accepted drafts: a counter move
            s.tokens.extend(item.draft[: r.accepted] + [r.token])
        return results

    def _accept(self, logits: torch.Tensor, seqs: list[_TargetSeq], items: list[VerifyItem]) -> list[Emitted]:
        device = logits.device
        batch, width = len(items), logits.shape[1] - 1
        draft_tokens = torch.full((batch, width), -1, dtype=torch.long)
        for i, item in enumerate(items):
            draft_tokens[i, : len(item.draft)] = torch.tensor(item.draft, dtype=torch.long)
        draft_tokens = draft_tokens.to(device)
        st, history = self._sampling([s.params for s in seqs], seqs, device)
        adjusted = adjust_logits(logits, st, history, draft_tokens)
        target_probs = probs_from_logits(adjusted, st)
        u_accept, u_sample = torch.zeros(batch, width), torch.zeros(batch)
        draft_probs = None
        if any(item.draft_probs is not None for item in items) and width:
            draft_probs = torch.zeros(batch, width, target_probs.shape[-1], device=device)
        for i, (s, item) in enumerate(zip(seqs, items)):
            k = len(item.draft)
            u = _uniforms(s, k + 1)  # depends only on this request: seeds reproduce whatever the batch
            u_accept[i, :k], u_sample[i] = u[:-1], u[-1]
            if draft_probs is not None:
                if item.draft_probs is not None:
                    draft_probs[i, :k] = item.draft_probs[:k].to(device)
                else:  # a deterministic draft in a batch with sampled ones: q is one-hot
                    draft_probs[i, torch.arange(k), draft_tokens[i, :k]] = 1.0
        num_draft = torch.tensor([len(it.draft) for it in items], device=device)
        n, nxt = verify_draft(target_probs, draft_tokens.clamp(min=0), num_draft, draft_probs,
                              u_accept.to(device), u_sample.to(device))
        n, nxt = n.tolist(), nxt.tolist()
        emitted = [item.draft[:a] + [t] for item, a, t in zip(items, n, nxt)]
        logprobs = self._logprobs(adjusted, st, seqs, emitted)
        return [Emitted(a, t, lp) for a, t, lp in zip(n, nxt, logprobs)]

    def _sampling(self, params: list[SamplingParams], seqs: list[_TargetSeq], device):
        st = SamplingTensors.from_params(params, self.vocab_size, device)
        history = None
        if any(p.penalized for p in params):
            history = TokenHistory([(s.tokens, s.num_prompt) for s in seqs], params, self.vocab_size, device,
                                   self.eos_ids)
        return st, history

    @staticmethod
    def _logprobs(adjusted: torch.Tensor, st: SamplingTensors, seqs: list[_TargetSeq],
                  emitted: list[list[int]]) -> list[list[TokenLogprob] | None]:
        """The emitted tokens' log-probabilities (positions 0..len-1 of adjusted [B, T, V]), for rows that asked."""
        out: list[list[TokenLogprob] | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return out
        index = torch.tensor(rows, device=adjusted.device)
        lp = logprobs_from_logits(adjusted[index], st.rows(index)).cpu()
        for r, i in enumerate(rows):
            n_top = seqs[i].params.logprobs
            entries = []
            for pos, token in enumerate(emitted[i]):
                top = lp[r, pos].topk(n_top) if n_top else None
                alts = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
                entries.append(TokenLogprob(token, float(lp[r, pos, token]), alts))
            out[i] = entries
        return out

    # --- state -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def max_context(self) -> int | None:
        return getattr(self.runner.model.config, "max_position_embeddings", None)

    def info(self) -> dict:
        return {"vocab_size": self.vocab_size, "max_context": self.max_context, "eos_ids": self.eos_ids}

    def load(self) -> dict:
        return {"sequences": len(self.seqs), "free_slots": self.runner.cache.num_free,
                "cache_occupied": self.runner.cache.occupied, "busy_s": self.busy_s, "passes": self.passes}

    def ping(self) -> bool:
        return True


def _uniforms(seq: _TargetSeq, n: int) -> torch.Tensor:
    if seq.params.greedy:  # p is one-hot: the rule needs no randomness; leave the RNG untouched
        return torch.zeros(n)
    return torch.rand(n, generator=seq.generator)
