"""The target side: a model, the KV caches of the sequences pinned to it, and the acceptance rule.

Verification happens here, next to the target's probabilities, so only token ids (and, for sampled
requests, the draft's q) travel to this worker, and only (accepted count, next token) travel back.
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
from cluster.sampling.logits import process_logits, sample_from
from cluster.types import SamplingParams


@dataclass
class PrefillItem:
    seq_id: str
    tokens: list[int]  # prompt (new request) or prompt + output so far (resume after a failover)
    params: SamplingParams
    seed: int
    resume: bool = False  # True: tokens[-1] was already emitted; cache the rest and sample nothing


@dataclass
class VerifyItem:
    seq_id: str
    draft: list[int]
    draft_probs: torch.Tensor | None = None  # [len(draft), V] processed q, None for a deterministic draft


@dataclass
class _TargetSeq:
    slot: int
    pending: int  # last emitted token: not yet in the cache, first input of the next verify
    params: SamplingParams
    generator: torch.Generator


class TargetWorker:
    def __init__(self, model_cfg: ModelConfig, num_slots: int, capacity: int, model: torch.nn.Module | None = None,
                 device: str = "cpu"):
        model = model if model is not None else load_model(model_cfg, device)
        self.runner = ModelRunner(model, num_slots, capacity)
        self.seqs: dict[str, _TargetSeq] = {}
        self.busy_s = 0.0  # time spent in forward passes: utilisation = busy_s / wall time
        self.passes = 0

    # --- calls -----------------------------------------------------------------------------------
    def prefill(self, items: list[PrefillItem]) -> list[int | None]:
        """Cache each sequence and return its first sampled token (None for resumed sequences)."""
        start = time.perf_counter()
        for item in items:
            if item.seq_id in self.seqs:
                raise ValueError(f"sequence {item.seq_id} is already on this worker")
            slot = self.runner.cache.allocate()
            gen = torch.Generator().manual_seed(item.seed)
            self.seqs[item.seq_id] = _TargetSeq(slot, item.tokens[-1], item.params, gen)
        feeds = [item.tokens[:-1] if item.resume else item.tokens for item in items]
        fresh = [i for i, (item, f) in enumerate(zip(items, feeds)) if f]  # a 1-token resume has nothing to cache
        out: list[int | None] = [None] * len(items)
        if fresh:
            seqs = [self.seqs[items[i].seq_id] for i in fresh]
            logits = self.runner.forward([s.slot for s in seqs], [feeds[i] for i in fresh], last_only=True)
            probs = _process(logits, [s.params for s in seqs])
            u = torch.stack([_uniforms(s, 1)[0] for s in seqs]).to(probs.device)
            tokens = sample_from(probs, u).tolist()
            for i, s, token in zip(fresh, seqs, tokens):
                if not items[i].resume:
                    s.pending = out[i] = token
        self._account(start)
        return out

    def verify(self, items: list[VerifyItem]) -> list[tuple[int, int]]:
        """One ragged forward over [pending] + draft per sequence; returns (accepted, next token) each."""
        start = time.perf_counter()
        seqs = [self.seqs[item.seq_id] for item in items]
        slots = [s.slot for s in seqs]
        lengths = [self.runner.cache.lengths[slot] for slot in slots]
        logits = self.runner.forward(slots, [[s.pending] + item.draft for s, item in zip(seqs, items)])
        target_probs = _process(logits, [s.params for s in seqs])
        width = logits.shape[1] - 1
        batch = len(items)
        draft_tokens = torch.zeros(batch, width, dtype=torch.long)
        u_accept, u_sample = torch.zeros(batch, width), torch.zeros(batch)
        draft_probs = None
        if any(item.draft_probs is not None for item in items) and width:
            draft_probs = torch.zeros(batch, width, target_probs.shape[-1])
        for i, (s, item) in enumerate(zip(seqs, items)):
            k = len(item.draft)
            draft_tokens[i, :k] = torch.tensor(item.draft, dtype=torch.long)
            u = _uniforms(s, k + 1)  # depends only on this request: seeds reproduce whatever the batch
            u_accept[i, :k], u_sample[i] = u[:-1], u[-1]
            if draft_probs is not None:
                if item.draft_probs is not None:
                    draft_probs[i, :k] = item.draft_probs[:k]
                else:  # a deterministic draft in a batch with sampled ones: q is one-hot
                    draft_probs[i, torch.arange(k), draft_tokens[i, :k]] = 1.0
        device = target_probs.device
        n, nxt = verify_draft(
            target_probs, draft_tokens.to(device), torch.tensor([len(it.draft) for it in items], device=device),
            None if draft_probs is None else draft_probs.to(device), u_accept.to(device), u_sample.to(device),
        )
        results = list(zip(n.tolist(), nxt.tolist()))
        for s, slot, length, (accepted, token) in zip(seqs, slots, lengths, results):
            self.runner.cache.truncate(slot, length + 1 + accepted)  # pending + accepted drafts: a counter move
            s.pending = token
        self._account(start)
        return results

    def verify_timed(self, items: list[VerifyItem]) -> tuple[list[tuple[int, int]], float]:
        """verify(), plus the seconds this worker computed: the router's overhead is the rest."""
        busy = self.busy_s
        return self.verify(items), self.busy_s - busy

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self.runner.cache.free(seq.slot)

    # --- state -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def max_context(self) -> int | None:
        return getattr(self.runner.model.config, "max_position_embeddings", None)

    def info(self) -> dict:
        model = self.runner.model
        return {"vocab_size": self.vocab_size, "max_context": self.max_context,
                "eos_ids": sorted(eos_ids(model))}  # the router adds its tokenizer's

    def load(self) -> dict:
        return {"sequences": len(self.seqs), "free_slots": self.runner.cache.num_free,
                "cache_occupied": self.runner.cache.occupied, "busy_s": self.busy_s, "passes": self.passes}

    def ping(self) -> bool:
        return True

    def _account(self, start: float) -> None:
        self.busy_s += time.perf_counter() - start
        self.passes += 1


def _process(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    return process_logits(logits, temperature, top_k, top_p)


def _uniforms(seq: _TargetSeq, n: int) -> torch.Tensor:
    if seq.params.greedy:  # p is one-hot: the rule needs no randomness; leave the RNG untouched
        return torch.zeros(n)
    return torch.rand(n, generator=seq.generator)
