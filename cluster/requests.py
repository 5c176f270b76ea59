"""Per-request bookkeeping: validation and tokenisation in, token-level stop conditions out. No model code.

Building a request (validating, tokenising) touches no engine state, so front doors do it in their own
threads, and only queueing it runs where the step loop runs.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field

from cluster.core.cost_model import Acceptance
from cluster.core.messages import Proposal
from cluster.errors import InvalidRequestError
from cluster.text import TextStream
from cluster.types import (
    FINISH_EOS,
    FINISH_LENGTH,
    FinalDelta,
    RequestLimits,
    RequestOutput,
    SamplingParams,
    SpecStats,
    TokenDelta,
    TokenLogprob,
)


@dataclass
class Sequence:
    request_id: str
    params: SamplingParams
    seed: int
    tokens: list[int]  # prompt + output
    num_prompt: int
    stats: SpecStats = field(default_factory=SpecStats)
    acceptance: Acceptance = field(default_factory=Acceptance)
    finish_reason: str | None = None
    error: str | None = None  # with finish_reason "error"
    # Where it runs and what it holds (the scheduler's view; loads are derived from these):
    target: str | None = None  # pinned target worker
    drafter: str | None = None  # draft worker drafting for it
    ready: bool = False  # prefilled: its pending token is known
    resume: bool = False  # its target died: re-prefill elsewhere from the tokens emitted so far
    deferred: bool = False  # admitted with its prefill deferred: its first verify pass feeds the prompt
    proposal: Proposal | None = None  # drafted for the next step (pipelining)
    draft_synced: int = 0  # tokens its draft worker has been sent
    last_accepted: int | None = None  # accepted nodes of its last proposal (the drafter's feedback)
    hidden: object = None  # the target's hidden state behind its pending token (for drafters that read it)
    arrival: float = 0.0
    first_token_at: float | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]


def collect(engine, streams: dict[str, TextStream]) -> list[RequestOutput]:
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
        self.id_prefix = ""  # a router on shared pools names its requests "<router id>.<uuid>"

    def build(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", "must be SamplingParams")
        params = params.validate(self.limits)
        tokens = self.tokenize(prompt)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return Sequence(request_id or self.id_prefix + uuid.uuid4().hex, params, seed, tokens, len(tokens))

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
