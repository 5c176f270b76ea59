"""The draft side: a drafter plus each pinned sequence's tokens, kept in sync by deltas from the engine."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from cluster.core.messages import DraftTask, Proposal
from cluster.drafters.base import Drafter, DraftRequest
from cluster.drafters.registry import BuildContext, build_drafter
from cluster.workers.isolation import Failure, isolated


@dataclass
class DraftResult:
    proposals: list[Proposal] = field(default_factory=list)  # one per task; empty where drafting failed
    compute_s: float = 0.0  # time this worker spent on the call (the cost model learns from it)
    failed: list[str] = field(default_factory=list)  # seq_ids whose drafting raised


class DraftWorker:
    def __init__(self, kind: str | None, section, context: BuildContext, drafter: Drafter | None = None):
        self.drafter = drafter if drafter is not None else build_drafter(kind, section, context)
        self.tokens: dict[str, list[int]] = {}
        self.busy_s = 0.0
        self.calls: deque[tuple[float, float]] = deque(maxlen=4096)  # (start, end) wall times of recent calls

    def propose(self, tasks: list[DraftTask]) -> DraftResult:
        """Proposals for every task. A task whose drafting raises gets an empty one (its request verifies
        without drafts: exact, only slower) and its state here is dropped, so it resynchronises next time."""
        start, wall = time.perf_counter(), time.time()
        result = DraftResult()
        for task, row in zip(tasks, isolated(self._propose, tasks)):
            if isinstance(row, Failure):
                self.release([task.seq_id])
                result.failed.append(task.seq_id)
                row = Proposal()
            result.proposals.append(row)
        result.compute_s = time.perf_counter() - start
        self.busy_s += result.compute_s
        self.calls.append((wall, time.time()))
        return result

    def _propose(self, tasks: list[DraftTask]) -> list[Proposal]:
        requests = []
        for task in tasks:
            tokens = self.tokens.setdefault(task.seq_id, [])
            if task.start > len(tokens):
                raise ValueError(f"{task.seq_id}: gap in token stream ({task.start} > {len(tokens)})")
            del tokens[task.start:]
            tokens.extend(task.new_tokens)
            if task.last_accepted is not None:
                self.drafter.observe(task.seq_id, task.last_accepted)
            requests.append(DraftRequest(task.seq_id, tokens, task.budget, task.params, task.seed, task.num_prompt,
                                         task.hidden))
        proposals = self.drafter.propose(requests)
        return [p.truncated(t.budget) for p, t in zip(proposals, tasks)]  # never more than was asked for

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self.tokens.pop(seq_id, None)
            self.drafter.release(seq_id)

    def release_prefix(self, prefix: str) -> int:
        """Free every sequence whose id starts with `prefix` (a dead router's); returns how many."""
        gone = [seq_id for seq_id in self.tokens if seq_id.startswith(prefix)]
        self.release(gone)
        return len(gone)

    def call_log(self) -> list[tuple[float, float]]:
        return list(self.calls)

    @property
    def num_sequences(self) -> int:
        """Sequences with state here (token lists, and KV slots for a model drafter)."""
        return max(len(self.tokens), self.drafter.num_sequences)

    def load(self) -> dict:
        return {"sequences": self.num_sequences, "busy_s": self.busy_s}

    def ping(self) -> bool:
        return True
