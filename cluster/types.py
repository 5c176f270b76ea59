"""What crosses the engine's boundary: sampling parameters, streamed deltas, finished outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.errors import InvalidRequestError

FINISH_LENGTH, FINISH_STOP, FINISH_EOS, FINISH_CANCELLED = "length", "stop", "eos", "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per-request seed: same seed, same output
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_tokens_limit: int) -> SamplingParams:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens > max_tokens_limit:
            raise InvalidRequestError("max_tokens", f"{self.max_tokens} exceeds the limit {max_tokens_limit}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidRequestError("seed", f"must be a non-negative integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        return self


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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


@dataclass
class StreamDelta:
    """Newly accepted output of one request after one engine step."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the request's last delta


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: SpecStats = field(default_factory=SpecStats)


@dataclass
class FinalDelta(StreamDelta):
    """The last delta of a request carries its totals."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: SpecStats = field(default_factory=SpecStats)
    full_text: str = ""
