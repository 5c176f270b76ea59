"""Per-request bookkeeping shared by the in-process engine and the Ray router: validation and
tokenisation in, stop conditions and streamed text out. No model code."""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from cluster.adaptive_k import next_k
from cluster.errors import EngineOverloadedError, InvalidRequestError
from cluster.text import find_stop, holdback
from cluster.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    FinalDelta,
    RequestOutput,
    SamplingParams,
    SpecStats,
    StreamDelta,
)


@dataclass
class Sequence:
    request_id: str
    params: SamplingParams
    seed: int
    tokens: list[int]  # prompt + output
    num_prompt: int
    k: int  # current draft length
    stats: SpecStats = field(default_factory=SpecStats)
    sent_chars: int = 0  # text already streamed
    draft_synced: int = 0  # tokens the draft worker has been sent
    finish_reason: str | None = None
    target: int = -1  # pinned target replica (router)
    drafter: int = -1  # pinned draft worker (router); -1: none
    arrival: float = 0.0
    first_token_at: float | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]


class RequestQueue:
    """Requests in flight, as the in-process engine and the Ray router both keep them: a waiting queue,
    a running list, cancellation. Subclasses free a finished request's caches in `_retire`."""

    def __init__(self, config):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def _init_requests(self, tokenizer, vocab_size: int, max_context: int | None, eos: set[int]) -> None:
        """Input validation and output processing, bounded by the model's context and the config."""
        limits = self.config.limits
        self.tokenizer = tokenizer
        self.max_model_len = min(limits.max_model_len, max_context or limits.max_model_len)
        self.requests = RequestBuilder(tokenizer, vocab_size, self.max_model_len, limits.max_tokens)
        self.output = OutputProcessor(tokenizer, eos, self.max_model_len)

    @property
    def drafting(self) -> bool:
        """Whether new requests start with speculation (K > 0)."""
        raise NotImplementedError

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Validate and queue a request; it joins the batch at the next step. Raises typed errors."""
        k = self.config.speculation.k if self.drafting else 0
        seq = self.requests.build(prompt, params or self.default_params(), k, request_id)
        if len(self.waiting) >= self.config.limits.max_waiting:
            raise EngineOverloadedError(f"{len(self.waiting)} requests already waiting")
        seq.arrival = time.perf_counter()
        self.waiting.append(seq)
        return seq.request_id

    def default_params(self, **overrides) -> SamplingParams:
        d = self.config.sampling
        max_tokens = min(d.max_tokens, self.config.limits.max_tokens)  # a default never breaks the limit
        base = dict(max_tokens=max_tokens, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)
        return SamplingParams(**{**base, **overrides})

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

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run a batch of requests to completion. Invalid input or a full queue raises before any is queued."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError("params", "one SamplingParams per prompt")
        for prompt, p in zip(prompts, plist):
            self.requests.build(prompt, p or self.default_params(), 0)
        if len(self.waiting) + len(prompts) > self.config.limits.max_waiting:  # add_request's own bound
            raise EngineOverloadedError(f"{len(prompts)} requests do not fit the waiting queue")
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, plist)]
        return collect(self.step, ids)

    def _apply_verify(self, seq: Sequence, draft: list[int], accepted: int, token: int, drafting: bool) -> StreamDelta:
        """Record one verify pass of `seq` (stats, adaptive K) and append what it accepted."""
        seq.stats.add(SpecStats(steps=1, drafted=len(draft), accepted=accepted))
        spec = self.config.speculation
        if drafting and spec.adaptive:
            seq.k = next_k(seq.k, len(draft), accepted, spec.k_min, spec.k_max)
        return self.output.append(seq, draft[:accepted] + [token])

    def _retire(self) -> None:
        raise NotImplementedError


def collect(step, ids: list[str]) -> list[RequestOutput]:
    """Call `step()` until every request in `ids` has finished; assemble their outputs."""
    results: dict[str, RequestOutput] = {}
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while len(results) < len(ids):
        for d in step():
            if d.request_id in tokens:
                tokens[d.request_id].extend(d.token_ids)
                if isinstance(d, FinalDelta):
                    results[d.request_id] = RequestOutput(
                        d.request_id, d.prompt_tokens, tokens[d.request_id], d.full_text, d.finish_reason, d.stats
                    )
    return [results[i] for i in ids]


class RequestBuilder:
    """Validate a request and turn it into a Sequence. Raises InvalidRequestError naming the field."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, max_tokens: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.max_model_len, self.max_tokens = max_model_len, max_tokens

    def build(self, prompt: str | list[int], params: SamplingParams, k: int, request_id: str | None = None) -> Sequence:
        params = params.validate(self.max_tokens)
        tokens = self.tokenize(prompt)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return Sequence(request_id or uuid.uuid4().hex, params, seed, tokens, len(tokens), k)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            tokens = self.tokenizer.encode(prompt)
        else:
            tokens = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in tokens):
                raise InvalidRequestError("prompt", f"token ids must be integers in [0, {self.vocab_size})")
        if not tokens:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(tokens) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(tokens)} tokens; at most {self.max_model_len - 1} fit the model's context"
            )
        return tokens


class OutputProcessor:
    """Append accepted tokens up to the first stop condition and produce the stream delta."""

    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int):
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len

    def draft_len(self, seq: Sequence) -> int:
        """Never draft past what the request may still emit, nor past the context."""
        remaining = seq.params.max_tokens - len(seq.output_ids) - 1
        room = self.max_model_len - len(seq.tokens) - 1
        return max(0, min(seq.k, remaining, room))

    def append(self, seq: Sequence, new_tokens: list[int]) -> StreamDelta:
        params, added, stop_at = seq.params, [], -1
        for token in new_tokens:
            seq.tokens.append(token)
            added.append(token)
            if token in self.eos_ids:
                seq.finish_reason = FINISH_EOS
            elif len(seq.output_ids) >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
                seq.finish_reason = FINISH_LENGTH
            elif params.stop:
                stop_at = find_stop(self.decode(seq), params.stop, max(0, seq.sent_chars - 64))
                if stop_at >= 0:
                    seq.finish_reason = FINISH_STOP
            if seq.finish_reason:
                break
        text = self.decode(seq)
        if stop_at >= 0:
            text = text[:stop_at]
        visible = len(text) if seq.finish_reason else len(text) - holdback(text, params.stop)
        piece = text[seq.sent_chars : visible] if visible > seq.sent_chars else ""
        seq.sent_chars = max(seq.sent_chars, visible)
        if seq.finish_reason:
            return FinalDelta(seq.request_id, added, piece, seq.finish_reason, seq.num_prompt,
                              len(seq.output_ids), seq.stats, text)
        return StreamDelta(seq.request_id, added, piece)

    def decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)


def eos_ids(model, tokenizer=None) -> set[int]:
    """End-of-sequence ids: the model's generation config, plus the tokenizer's if given."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
