"""The in-process speculative decoding engine: admission, batched prefill, draft, verify, emit.

One `step()` reads top to bottom:
  1. admit waiting requests into free cache slots and prefill them in one ragged batch (first token);
  2. ask the drafter for up to K tokens for every running request (K = 0: plain decoding);
  3. verify all drafts in one ragged target forward and apply the acceptance rule;
  4. roll each target cache back to the accepted length, append, check stop conditions, stream;
  5. free the caches of finished requests.
Invariant: a running request's target cache holds all its tokens but the last (the "pending" one,
which is the first input of the next verify pass).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from cluster.adaptive_k import next_k
from cluster.config import EngineConfig
from cluster.drafters.base import Drafter, DraftRequest
from cluster.drafters.registry import build_drafter
from cluster.errors import EngineOverloadedError, InvalidRequestError
from cluster.models.loader import load_model, load_tokenizer
from cluster.models.runner import ModelRunner
from cluster.sampling.acceptance import verify_draft
from cluster.sampling.logits import process_logits, sample_from
from cluster.text import find_stop, holdback
from cluster.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    RequestOutput,
    SamplingParams,
    SpecStats,
    StreamDelta,
)

log = logging.getLogger(__name__)

MAX_DRAFT_FAILURES = 3  # consecutive drafter errors before the engine stops drafting


@dataclass
class _Sequence:
    request_id: str
    params: SamplingParams
    generator: torch.Generator
    tokens: list[int]  # prompt + output
    num_prompt: int
    k: int
    slot: int = -1
    stats: SpecStats = field(default_factory=SpecStats)
    sent_chars: int = 0  # text already streamed
    finish_reason: str | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]


@dataclass
class EngineTimings:
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    steps: int = 0


@dataclass
class FinalDelta(StreamDelta):
    """The last delta of a request carries its totals."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: SpecStats = field(default_factory=SpecStats)
    full_text: str = ""


class SpecEngine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        drafter: Drafter | None = None,
    ):
        self.config = config
        limits, spec = config.limits, config.speculation
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.target)
        model = model if model is not None else load_model(config.target)
        context = getattr(model.config, "max_position_embeddings", None) or limits.max_model_len
        self.max_model_len = min(limits.max_model_len, context)
        capacity = self.max_model_len + spec.k_max + 1  # a verify pass may run K+1 past the last token
        self.target = ModelRunner(model, limits.max_batch_size, capacity)
        if drafter is None and spec.k > 0:
            drafter = build_drafter(config.drafter, limits.max_batch_size, capacity, self.target.vocab_size)
        self.drafter = drafter if spec.k > 0 else None
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.timings = EngineTimings()
        self.stats = SpecStats()
        self.draft_failures = 0

    # --- requests -------------------------------------------------------------------------------
    def default_params(self, **overrides) -> SamplingParams:
        d = self.config.sampling
        base = dict(max_tokens=d.max_tokens, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)
        return SamplingParams(**{**base, **overrides})

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validate and queue a request; it joins the batch at the next step. Raises typed errors."""
        params = (params or self.default_params()).validate(self.config.limits.max_tokens)
        tokens = self._tokenize(prompt)
        if len(self.waiting) >= self.config.limits.max_waiting:
            raise EngineOverloadedError(f"{len(self.waiting)} requests already waiting")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        seq = _Sequence(
            request_id=request_id or uuid.uuid4().hex,
            params=params,
            generator=torch.Generator().manual_seed(seed),
            tokens=tokens,
            num_prompt=len(tokens),
            k=self.config.speculation.k if self.drafter else 0,
        )
        self.waiting.append(seq)
        return seq.request_id

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            tokens = self.tokenizer.encode(prompt)
        else:
            tokens = list(prompt)
            vocab = self.target.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
                raise InvalidRequestError("prompt", f"token ids must be integers in [0, {vocab})")
        if not tokens:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(tokens) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(tokens)} tokens; at most {self.max_model_len - 1} fit the model's context"
            )
        return tokens

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its caches at once. Returns whether it was still in flight."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return True
        for seq in self.running:
            if seq.request_id == request_id:
                seq.finish_reason = FINISH_CANCELLED
                self._retire()
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        deltas: list[StreamDelta] = []
        self._admit(deltas)  # 1
        if self.running:
            batch = list(self.running)
            drafts, draft_probs = self._draft(batch)  # 2
            accepted = self._verify(batch, drafts, draft_probs)  # 3
            for seq, draft, (n, token) in zip(batch, drafts, accepted):  # 4
                self.target.cache.truncate(seq.slot, len(seq.tokens) + n)  # keep pending + n accepted
                step_stats = SpecStats(steps=1, drafted=len(draft), accepted=n)
                seq.stats.add(step_stats)
                self.stats.add(step_stats)
                if self.drafter is not None and self.config.speculation.adaptive:
                    spec = self.config.speculation
                    seq.k = next_k(seq.k, len(draft), n, spec.k_min, spec.k_max)
                self._append(seq, draft[:n] + [token], deltas)
            self.timings.steps += 1
        self._retire()  # 5
        return deltas

    def _admit(self, deltas: list[StreamDelta]) -> None:
        new = []
        while self.waiting and self.target.cache.num_free:
            seq = self.waiting.popleft()
            seq.slot = self.target.cache.allocate()
            new.append(seq)
        if not new:
            return
        start = time.perf_counter()
        logits = self.target.forward([s.slot for s in new], [s.tokens for s in new], last_only=True)
        probs = self._process(logits, new)
        u = torch.stack([self._uniforms(s, 1)[0] for s in new]).to(probs.device)
        first = sample_from(probs, u).tolist()
        self.timings.prefill_s += time.perf_counter() - start
        for seq, token in zip(new, first):
            self.running.append(seq)
            self._append(seq, [token], deltas)

    def _draft(self, batch: list[_Sequence]) -> tuple[list[list[int]], torch.Tensor | None]:
        """Up to K tokens per request, and q where the drafter has one. A failing drafter costs only speed."""
        drafts: list[list[int]] = [[] for _ in batch]
        ks = [self._draft_len(s) for s in batch]
        rows = [i for i, k in enumerate(ks) if k > 0]
        if self.drafter is None or not rows:
            return drafts, None
        start = time.perf_counter()
        try:
            proposal = self.drafter.propose(
                [DraftRequest(batch[i].request_id, batch[i].tokens, ks[i], batch[i].params, batch[i].generator)
                 for i in rows]
            )
            vocab = self.target.vocab_size
            for row, i in enumerate(rows):
                tokens = proposal.tokens[row][: ks[i]]
                if any(not 0 <= t < vocab for t in tokens):
                    raise ValueError(f"drafter proposed a token outside [0, {vocab})")
                drafts[i] = tokens
            self.draft_failures = 0
        except Exception:
            self.draft_failures += 1
            log.exception("drafter failed (%d in a row); verifying without drafts", self.draft_failures)
            if self.draft_failures >= MAX_DRAFT_FAILURES:
                log.error("drafter disabled after %d failures: target-only decoding", self.draft_failures)
                self.drafter = None
            return [[] for _ in batch], None
        finally:
            self.timings.draft_s += time.perf_counter() - start
        width = max(len(d) for d in drafts)
        if proposal.probs is None or width == 0:
            return drafts, None
        draft_probs = torch.zeros(len(batch), width, proposal.probs.shape[-1], device=proposal.probs.device)
        draft_probs[rows] = proposal.probs[:, :width]
        return drafts, draft_probs

    def _verify(
        self, batch: list[_Sequence], drafts: list[list[int]], draft_probs: torch.Tensor | None
    ) -> list[tuple[int, int]]:
        start = time.perf_counter()
        logits = self.target.forward([s.slot for s in batch], [[s.tokens[-1]] + d for s, d in zip(batch, drafts)])
        target_probs = self._process(logits, batch)
        width = logits.shape[1] - 1
        draft_tokens = torch.zeros(len(batch), width, dtype=torch.long)
        u_accept = torch.zeros(len(batch), width)
        u_sample = torch.zeros(len(batch))
        for i, (seq, draft) in enumerate(zip(batch, drafts)):
            draft_tokens[i, : len(draft)] = torch.tensor(draft, dtype=torch.long)
            u = self._uniforms(seq, len(draft) + 1)  # depends only on this request: seeds reproduce
            u_accept[i, : len(draft)], u_sample[i] = u[:-1], u[-1]
        num_draft = torch.tensor([len(d) for d in drafts])
        device = target_probs.device
        if draft_probs is not None:
            draft_probs = draft_probs.to(device)
        n, tokens = verify_draft(
            target_probs, draft_tokens.to(device), num_draft.to(device), draft_probs, u_accept.to(device),
            u_sample.to(device),
        )
        self.timings.verify_s += time.perf_counter() - start
        return list(zip(n.tolist(), tokens.tolist()))

    # --- helpers --------------------------------------------------------------------------------
    def _draft_len(self, seq: _Sequence) -> int:
        # Never draft past what the request may still emit, nor past the context.
        remaining = seq.params.max_tokens - len(seq.output_ids) - 1
        room = self.max_model_len - len(seq.tokens) - 1
        return max(0, min(seq.k, remaining, room))

    def _process(self, logits: torch.Tensor, batch: list[_Sequence]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([s.params.temperature for s in batch], dtype=torch.float32, device=device)
        top_k = torch.tensor([s.params.top_k for s in batch], device=device)
        top_p = torch.tensor([s.params.top_p for s in batch], dtype=torch.float32, device=device)
        return process_logits(logits, temperature, top_k, top_p)

    @staticmethod
    def _uniforms(seq: _Sequence, n: int) -> torch.Tensor:
        if seq.params.greedy:  # p is one-hot: the rule needs no randomness; leave the RNG untouched
            return torch.zeros(n)
        return torch.rand(n, generator=seq.generator)

    def _append(self, seq: _Sequence, new_tokens: list[int], deltas: list[StreamDelta]) -> None:
        """Append accepted tokens up to the first stop condition and stream the new text."""
        params, added, stop_at = seq.params, [], -1
        for token in new_tokens:
            seq.tokens.append(token)
            added.append(token)
            if token in self.eos_ids:
                seq.finish_reason = FINISH_EOS
            elif len(seq.output_ids) >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
                seq.finish_reason = FINISH_LENGTH
            elif params.stop:
                stop_at = find_stop(self._decode(seq), params.stop, max(0, seq.sent_chars - 64))
                if stop_at >= 0:
                    seq.finish_reason = FINISH_STOP
            if seq.finish_reason:
                break
        text = self._decode(seq)
        if stop_at >= 0:
            text = text[:stop_at]
        visible = len(text) if seq.finish_reason else len(text) - holdback(text, params.stop)
        piece = text[seq.sent_chars : visible] if visible > seq.sent_chars else ""
        seq.sent_chars = max(seq.sent_chars, visible)
        if seq.finish_reason:
            deltas.append(
                FinalDelta(seq.request_id, added, piece, seq.finish_reason, len(seq.tokens) - len(seq.output_ids),
                           len(seq.output_ids), seq.stats, text)
            )
        else:
            deltas.append(StreamDelta(seq.request_id, added, piece))

    def _decode(self, seq: _Sequence) -> str:
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)

    def _retire(self) -> None:
        for seq in [s for s in self.running if s.finish_reason]:
            self.running.remove(seq)
            self.target.cache.free(seq.slot)
            if self.drafter is not None:
                self.drafter.release(seq.request_id)

    # --- convenience front ends -----------------------------------------------------------------
    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run a batch of requests to completion. Invalid input raises before any request is queued."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError("params", "one SamplingParams per prompt")
        for prompt, p in zip(prompts, plist):  # validate all first: nothing half-queued on error
            (p or self.default_params()).validate(self.config.limits.max_tokens)
            self._tokenize(prompt)
        if len(self.waiting) + len(prompts) > self.config.limits.max_waiting + self.target.cache.num_free:
            raise EngineOverloadedError(f"{len(prompts)} requests do not fit the waiting queue")
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, plist)]
        results: dict[str, RequestOutput] = {}
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while len(results) < len(ids):
            for d in self.step():
                if d.request_id in tokens:
                    tokens[d.request_id].extend(d.token_ids)
                    if isinstance(d, FinalDelta):
                        results[d.request_id] = RequestOutput(
                            d.request_id, d.prompt_tokens, tokens[d.request_id], d.full_text, d.finish_reason,
                            d.stats,
                        )
        return [results[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield this request's deltas as steps complete; closing the iterator cancels the request."""
        request_id = self.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for d in self.step():
                    if d.request_id == request_id:
                        finished = d.finish_reason is not None
                        yield d
        finally:
            if not finished:
                self.abort(request_id)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
