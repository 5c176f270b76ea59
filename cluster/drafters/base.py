"""The drafter interface. A drafter sees each sequence's whole token list and proposes what comes next.

Sequences only grow, so a drafter with state (a KV cache) keeps what it has seen and compares it with the
tokens it is handed: a rejected draft shows up as a mismatch after the last accepted token, and the
drafter rolls back to the common prefix. No separate rollback message is needed, and a drafter that
missed a step (or was replaced) resynchronises on its next call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from cluster.types import SamplingParams


@dataclass
class DraftRequest:
    seq_id: str
    tokens: list[int]  # prompt + output so far
    k: int  # propose at most this many tokens (>= 1)
    params: SamplingParams
    generator: torch.Generator | None = None  # the request's RNG, for drafters that sample
    num_prompt: int = 0  # tokens[:num_prompt] is the prompt (penalties count the output only)


@dataclass
class DraftProposal:
    tokens: list[list[int]]  # per request, 0..k tokens
    probs: list[torch.Tensor | None] = field(default_factory=list)  # per request: [len, V] processed q, or
    # None (or an empty list): deterministic (one-hot q)
    compute_s: float = 0.0  # time the draft worker spent on this call (the router's pipelining policy reads it)
    failed: int = 0  # requests whose drafting raised (they got empty drafts)

    def q(self, row: int) -> torch.Tensor | None:
        return self.probs[row] if self.probs else None


class Drafter(ABC):
    name: str = "base"

    @abstractmethod
    def propose(self, batch: list[DraftRequest]) -> DraftProposal: ...

    def release(self, seq_id: str) -> None:
        """The sequence finished or was cancelled: drop its state."""

    @property
    def num_sequences(self) -> int:
        """Sequences holding state (e.g. KV cache slots) here; 0 once all are released."""
        return 0
