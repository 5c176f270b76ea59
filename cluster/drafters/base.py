"""The drafter interface. A drafter sees each sequence's whole token list and proposes what comes next,
as a token tree (a chain is the simplest tree), within a node budget.

Sequences only grow, so a drafter with state (a KV cache) keeps what it has seen and compares it with the
tokens it is handed: a rejected draft shows up as a mismatch after the last accepted token, and the
drafter rolls back to the common prefix. No rollback message is needed, and a drafter that missed a step
(or was replaced) resynchronises on its next call. `observe` tells it how its last proposal fared.

Randomness is keyed (cluster.sampling.keyed): a drafter that samples uses (seed, output position), so
what it proposes never depends on the batch. Under the coupled rule it samples argmax_v q_v / E_v with
the target's own race noise E, which makes its tokens agree with the target's as often as possible.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from cluster.core.messages import Proposal
from cluster.types import SamplingParams


@dataclass
class DraftRequest:
    seq_id: str
    tokens: list[int]  # prompt + output so far
    budget: int  # propose at most this many nodes (>= 1)
    params: SamplingParams
    seed: int = 0
    num_prompt: int = 0  # tokens[:num_prompt] is the prompt
    hidden: object = None  # [H] target hidden state at the position that chose tokens[-1], if the kind reads it

    @property
    def position(self) -> int:
        """Output position of the first drafted token (the key of its random draws)."""
        return len(self.tokens) - self.num_prompt


class Drafter(ABC):
    name: str = "base"

    @abstractmethod
    def propose(self, batch: list[DraftRequest]) -> list[Proposal]: ...

    def observe(self, seq_id: str, accepted: int) -> None:
        """How many nodes of this sequence's last proposal the target accepted (a feedback hook)."""

    def release(self, seq_id: str) -> None:
        """The sequence finished or was cancelled: drop its state."""

    @property
    def num_sequences(self) -> int:
        """Sequences holding state (e.g. KV cache slots) here; 0 once all are released."""
        return 0
