"""Per-request bookkeeping shared by the in-process engine and the Ray router: validation and
tokenisation in, token-level stop conditions out. No model code.

Building a request (validating, tokenising) touches no engine state, so front doors do it in their own
threads (`build`), and only `enqueue` runs where the step loop runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from cluster.adaptive_k import next_k
from cluster.errors import EngineOverloadedError, InvalidRequestError
from cluster.metrics import EngineMetrics
from cluster.text import TextStream
from cluster.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_ERROR,
    FINISH_LENGTH,
    FinalDelta,
    RequestLimits,
    RequestOutput,
    SamplingParams,
    SpecStats,
    TokenDelta,
    TokenLogprob,
)

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    request_id: str
    params: SamplingParams
    seed: int
    tokens: list[int]  # prompt + output
    num_prompt: int
    k: int  # current draft length
    stats: SpecStats = field(default_factory=SpecStats)
    draft_synced: int = 0  # tokens the draft worker has been sent
    finish_reason: str | None = None
    error: str | None = None  # with finish_reason "error"
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

    def _init_requests(self, tokenizer, vocab_size: int, max_context: int | None, eos: set[int],
                       metrics_label: str) -> None:
        """Input validation and output processing, bounded by the model's context and the config."""
        limits = self.config.limits
        self.tokenizer = tokenizer
        self.eos_ids = set(eos)
        self.max_model_len = min(limits.max_model_len, max_context or limits.max_model_len)
        request_limits = RequestLimits(limits.max_tokens, vocab_size, limits.max_stop_strings, limits.max_stop_chars)
        max_chars = limits.max_prompt_chars or self.max_model_len * longest_token_chars(tokenizer)
        self.requests = RequestBuilder(tokenizer, request_limits, self.max_model_len, max_chars)
        self.output = OutputProcessor(self.eos_ids, self.max_model_len)
        self.metrics = EngineMetrics(metrics_label)
        self._started = time.perf_counter()

    @property
    def drafting(self) -> bool:
        """Whether new requests start with speculation (K > 0)."""
        raise NotImplementedError

    def build(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> Sequence:
        """Validate and tokenise a request without touching engine state (safe from any thread)."""
        k = self.config.speculation.k if self.drafting else 0
        return self.requests.build(prompt, params or self.default_params(), k, request_id)

    def enqueue(self, seq: Sequence) -> str:
        """Queue a built request; it joins the batch at the next step."""
        if len(self.waiting) >= self.config.limits.max_waiting:
            raise EngineOverloadedError(f"{len(self.waiting)} requests already waiting")
        seq.k = self.config.speculation.k if self.drafting else 0
        seq.arrival = time.perf_counter()
        self.waiting.append(seq)
        return seq.request_id

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Validate and queue a request; it joins the batch at the next step. Raises typed errors."""
        return self.enqueue(self.build(prompt, params, request_id))

    def default_params(self, **overrides) -> SamplingParams:
        d = self.config.sampling
        max_tokens = min(d.max_tokens, self.config.limits.max_tokens)  # a default never breaks the limit
        base = dict(max_tokens=max_tokens, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)
        return SamplingParams(**{**base, **overrides})

    def abort(self, request_id: str, reason: str = FINISH_CANCELLED) -> Sequence | None:
        """Finish a request now (cancelled, or stopped by a stop string found outside the step) and free
        its caches. Returns the sequence, or None if it was no longer in flight."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish_reason = reason
                self.metrics.requests.labels(reason).inc()
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                seq.finish_reason = reason
                self._retire()
                return seq
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run a batch of requests to completion. Invalid input or a full queue raises before any is queued."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError("params", "one SamplingParams per prompt")
        seqs = [self.build(prompt, p) for prompt, p in zip(prompts, plist)]
        if len(self.waiting) + len(seqs) > self.config.limits.max_waiting:  # enqueue's own bound
            raise EngineOverloadedError(f"{len(prompts)} requests do not fit the waiting queue")
        streams = {seq.request_id: self.text_stream(seq) for seq in seqs}
        for seq in seqs:
            self.enqueue(seq)
        return collect(self, streams)

    def text_stream(self, seq: Sequence) -> TextStream:
        return TextStream(self.tokenizer, seq.request_id, seq.params, seq.num_prompt, seq.seed)

    # --- shared step bookkeeping ----------------------------------------------------------------
    def _emit(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None) -> TokenDelta:
        """Append emitted tokens (failing the request alone if that raises) and make its delta."""
        try:
            delta = self.output.append(seq, tokens, logprobs)
        except Exception as error:
            log.exception("output processing failed for request %s", seq.request_id)
            return self._fail(seq, f"{type(error).__name__} in output processing")
        if seq.first_token_at is None and delta.token_ids:
            seq.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(seq.first_token_at - seq.arrival)
        self.metrics.tokens.inc(len(delta.token_ids))
        return delta

    def _apply_verify(self, seq: Sequence, draft: list[int], accepted: int, token: int,
                      logprobs: list[TokenLogprob] | None, drafting: bool) -> TokenDelta:
        """Record one verify pass of `seq` (stats, adaptive K, metrics) and append what it accepted."""
        seq.stats.add(SpecStats(steps=1, drafted=len(draft), accepted=accepted))
        self.metrics.observe_verify(len(draft), accepted)
        spec = self.config.speculation
        if drafting and spec.adaptive:
            seq.k = next_k(seq.k, len(draft), accepted, spec.k_min, spec.k_max)
        return self._emit(seq, draft[:accepted] + [token], logprobs)

    def _fail(self, seq: Sequence, message: str) -> TokenDelta:
        """Fail one request alone: it is retired (its caches freed) at the end of the step."""
        log.error("request %s failed: %s", seq.request_id, message)
        seq.finish_reason, seq.error = FINISH_ERROR, message
        self.metrics.errors.inc()
        return self.output.final(seq, [], None)

    def _finished(self, seq: Sequence) -> None:
        """Metrics for a request leaving the batch."""
        self.metrics.requests.labels(seq.finish_reason).inc()
        n = len(seq.output_ids)
        if seq.first_token_at is not None and n > 1:
            self.metrics.tpot.observe((time.perf_counter() - seq.first_token_at) / (n - 1))

    def _retire(self) -> None:
        raise NotImplementedError


def collect(engine: RequestQueue, streams: dict[str, TextStream]) -> list[RequestOutput]:
    """Step until every request in `streams` has finished; returns their outputs in order. Text and stop
    strings are handled here, as a front door's consumer thread would."""
    results: dict[str, RequestOutput] = {}
    while len(results) < len(streams):
        for d in engine.step():
            stream = streams.get(d.request_id)
            if stream is None or d.request_id in results:
                continue
            out = stream.feed(d)
            if stream.stopped:
                seq = engine.abort(d.request_id, out.finish_reason)
                out.stats = seq.stats if seq is not None else out.stats
            if isinstance(out, FinalDelta):
                results[d.request_id] = RequestOutput(d.request_id, out.prompt_tokens, stream.ids, out.full_text,
                                                      out.finish_reason, out.stats,
                                                      stream.logprobs if stream.params.logprobs is not None else None,
                                                      stream.seed)
    return [results[i] for i in streams]


class RequestBuilder:
    """Validate a request and turn it into a Sequence. Raises InvalidRequestError naming the field."""

    def __init__(self, tokenizer, limits: RequestLimits, max_model_len: int, max_prompt_chars: int):
        self.tokenizer, self.limits = tokenizer, limits
        self.max_model_len, self.max_prompt_chars = max_model_len, max_prompt_chars
        self._lock = threading.Lock()  # HF fast tokenizers are not safe to encode from several threads

    def build(self, prompt: str | list[int], params: SamplingParams, k: int, request_id: str | None = None) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", "must be SamplingParams")
        params = params.validate(self.limits)
        tokens = self.tokenize(prompt)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return Sequence(request_id or uuid.uuid4().hex, params, seed, tokens, len(tokens), k)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            if len(prompt) > self.max_prompt_chars:  # checked before tokenising: bounded work per request
                raise InvalidRequestError("prompt", f"{len(prompt)} characters; at most {self.max_prompt_chars}")
            with self._lock:
                tokens = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            tokens = list(prompt)
            vocab = self.limits.vocab_size
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
                raise InvalidRequestError("prompt", f"token ids must be integers in [0, {vocab})")
        else:
            raise InvalidRequestError("prompt", "must be a string or a list of token ids")
        if not tokens:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(tokens) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(tokens)} tokens; at most {self.max_model_len - 1} fit the model's context"
            )
        return tokens


class OutputProcessor:
    """Append emitted tokens up to the first token-level stop (EOS, max_tokens, context end)."""

    def __init__(self, eos_ids: set[int], max_model_len: int):
        self.eos_ids, self.max_model_len = eos_ids, max_model_len

    def draft_len(self, seq: Sequence) -> int:
        """Never draft past what the request may still emit, nor past the context."""
        remaining = seq.params.max_tokens - len(seq.output_ids) - 1
        room = self.max_model_len - len(seq.tokens) - 1
        return max(0, min(seq.k, remaining, room))

    def append(self, seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprob] | None) -> TokenDelta:
        added: list[int] = []
        for token in new_tokens:
            seq.tokens.append(token)
            added.append(token)
            if token in self.eos_ids:
                seq.finish_reason = FINISH_EOS
            elif len(seq.output_ids) >= seq.params.max_tokens or len(seq.tokens) >= self.max_model_len:
                seq.finish_reason = FINISH_LENGTH
            if seq.finish_reason:
                break
        logprobs = None if logprobs is None else logprobs[: len(added)]
        if seq.finish_reason:
            return self.final(seq, added, logprobs)
        return TokenDelta(seq.request_id, added, logprobs)

    @staticmethod
    def final(seq: Sequence, added: list[int], logprobs) -> TokenDelta:
        return TokenDelta(seq.request_id, added, logprobs, seq.finish_reason, seq.num_prompt, seq.stats, seq.error)


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers: a prompt longer than max_model_len times this
    cannot fit, so it is refused before it is tokenised."""
    return max((len(piece) for piece in tokenizer.get_vocab()), default=1) or 1


def eos_ids(model, tokenizer=None) -> set[int]:
    """End-of-sequence ids: the model's generation config, plus the tokenizer's if given."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
