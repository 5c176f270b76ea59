"""What crosses the engine's boundary: sampling parameters, streamed deltas, finished outputs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from cluster.errors import InvalidRequestError

FINISH_LENGTH, FINISH_STOP, FINISH_EOS, FINISH_CANCELLED = "length", "stop", "eos", "cancelled"
FINISH_ERROR = "error"  # the request failed inside the server; it alone, with its resources freed

SAMPLING_EPS = 1e-5  # a temperature below this is greedy (as vLLM): 1/T would overflow to inf/NaN
MAX_SEED = 2**64 - 1  # seeds are unsigned 64-bit, as in the gRPC API
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI
MAX_LOGIT_BIAS = 100.0  # |bias|, as OpenAI
MAX_LOGIT_BIAS_ENTRIES = 1024


@dataclass(frozen=True)
class RequestLimits:
    """The domains a request is validated against: the config's limits and the model's vocabulary."""

    max_tokens: int
    vocab_size: int
    max_stop_strings: int = 16
    max_stop_chars: int = 256


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    min_tokens: int = 0  # EOS is suppressed and stop strings are not matched before this many tokens
    temperature: float = 0.0  # 0 (or < SAMPLING_EPS) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per-request seed: same seed, same output; None: the server draws one
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # subtracted once from every token already in the output (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output (OpenAI)
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt+output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    logprobs: int | None = None  # None: off; N >= 0: each token's logprob and its N most likely alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether p depends on the tokens before each position (penalties, or EOS held off)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens)

    def validate(self, limits: RequestLimits) -> SamplingParams:
        """Check every field against its real domain; return the normalised params (tiny temperatures
        become greedy, top_k >= vocabulary becomes off). Raises InvalidRequestError naming the field."""
        _int("max_tokens", self.max_tokens, 1, limits.max_tokens)
        _int("min_tokens", self.min_tokens, 0, self.max_tokens)
        _float("temperature", self.temperature, 0.0, math.inf)
        _float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _int("top_k", self.top_k, 0, None)
        if self.seed is not None:
            _int("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        if len(self.stop) > limits.max_stop_strings:
            raise InvalidRequestError("stop", f"at most {limits.max_stop_strings} stop strings, got {len(self.stop)}")
        if any(len(s) > limits.max_stop_chars for s in self.stop):
            raise InvalidRequestError("stop", f"a stop string may have at most {limits.max_stop_chars} characters")
        _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_open=True)
        if not isinstance(self.logit_bias, tuple) or len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequestError("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} (token id, bias) entries")
        for entry in self.logit_bias:
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise InvalidRequestError("logit_bias", "entries must be (token id, bias) pairs")
            _int("logit_bias", entry[0], 0, limits.vocab_size - 1, what="token id")
            _float("logit_bias", entry[1], -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, what="bias")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        return dataclasses.replace(
            self,
            temperature=0.0 if self.temperature < SAMPLING_EPS else float(self.temperature),
            top_k=0 if self.top_k >= limits.vocab_size else self.top_k,
        )


def _int(name: str, value, low: int, high: int | None, what: str = "") -> None:
    label = f"{what} " if what else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, f"{label}must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidRequestError(name, f"{label}must be in {bound}, got {value}")


def _float(name: str, value, low: float, high: float, low_open: bool = False, what: str = "") -> None:
    label = f"{what} " if what else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(name, f"{label}must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise InvalidRequestError(name, f"{label}must be in {bound}, got {value!r}")


@dataclass
class SpecStats:
    """Speculation counters for one request (or summed over many)."""

    steps: int = 0  # target passes
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add(self, other: SpecStats) -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the target, and the `top` most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TokenDelta:
    """Tokens one engine step added to a request. The step loop works in tokens; text is made from them
    outside the step (cluster.text.TextStream), in the consumer's thread."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for logprobs
    finish_reason: str | None = None  # set on the request's last delta
    # Set on the last delta:
    prompt_tokens: int = 0
    stats: SpecStats | None = None
    error: str | None = None  # with finish_reason "error": what went wrong, for the server log


@dataclass
class StreamDelta:
    """Newly accepted output of one request, as text."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the request's last delta
    logprobs: list[TokenLogprob] | None = None


@dataclass
class FinalDelta(StreamDelta):
    """The last delta of a request carries its totals."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: SpecStats = field(default_factory=SpecStats)
    full_text: str = ""
    seed: int = 0
    error: str | None = None
    full_logprobs: list[TokenLogprob] | None = None  # every token's, when the request asked


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: SpecStats = field(default_factory=SpecStats)
    logprobs: list[TokenLogprob] | None = None
    seed: int = 0
