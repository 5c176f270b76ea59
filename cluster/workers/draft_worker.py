"""The draft side: a drafter plus each pinned sequence's tokens, kept in sync by deltas from the router."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cluster.config import DrafterConfig
from cluster.drafters.base import DraftProposal, Drafter, DraftRequest
from cluster.drafters.registry import build_drafter
from cluster.types import SamplingParams
from cluster.workers.isolation import Failure, isolated


def draft_seed(seed: int) -> int:
    """The drafter's RNG must be independent of the target's acceptance uniforms (a shared stream would
    correlate x ~ q with u and bias the output), so it gets its own seed derived from the request's."""
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 63)


@dataclass
class DraftItem:
    seq_id: str
    start: int  # new_tokens begin at this position of the sequence
    new_tokens: list[int]  # tokens the worker has not been sent yet (accepted tokens never change)
    k: int
    params: SamplingParams
    seed: int
    num_prompt: int = 0


class DraftWorker:
    def __init__(self, cfg: DrafterConfig | None, num_slots: int, capacity: int, target_vocab: int,
                 drafter: Drafter | None = None, device: str = "cpu", eos_ids: tuple[int, ...] = ()):
        if drafter is None:
            drafter = build_drafter(cfg, num_slots, capacity, target_vocab, device, tuple(eos_ids))
        self.drafter = drafter
        self.tokens: dict[str, list[int]] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.busy_s = 0.0

    def propose(self, items: list[DraftItem]) -> DraftProposal:
        """Drafts for every item. An item whose drafting raises gets an empty draft (it verifies without
        one: exact, only slower) and its state here is dropped, so it resynchronises next time."""
        start = time.perf_counter()
        rows = isolated(self._propose, items)
        proposal = DraftProposal([], [])
        for item, row in zip(items, rows):
            if isinstance(row, Failure):
                self.release([item.seq_id])
                proposal.failed += 1
                row = ([], None)
            proposal.tokens.append(row[0])
            proposal.probs.append(row[1])
        if all(q is None for q in proposal.probs):
            proposal.probs = []
        proposal.compute_s = time.perf_counter() - start
        self.busy_s += proposal.compute_s
        return proposal

    def _propose(self, items: list[DraftItem]) -> list[tuple[list[int], torch.Tensor | None]]:
        requests = []
        for item in items:
            tokens = self.tokens.setdefault(item.seq_id, [])
            if item.start > len(tokens):
                raise ValueError(f"{item.seq_id}: gap in token stream ({item.start} > {len(tokens)})")
            del tokens[item.start:]
            tokens.extend(item.new_tokens)
            gen = self.generators.get(item.seq_id)
            if gen is None:
                gen = self.generators[item.seq_id] = torch.Generator().manual_seed(draft_seed(item.seed))
            requests.append(DraftRequest(item.seq_id, tokens, item.k, item.params, gen, item.num_prompt))
        proposal = self.drafter.propose(requests)
        return [(proposal.tokens[row], proposal.q(row)) for row in range(len(items))]

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self.tokens.pop(seq_id, None)
            self.generators.pop(seq_id, None)
            self.drafter.release(seq_id)

    @property
    def num_sequences(self) -> int:
        """Sequences with state here (token lists, and KV slots for a model drafter)."""
        return max(len(self.tokens), self.drafter.num_sequences)

    def load(self) -> dict:
        return {"sequences": self.num_sequences, "busy_s": self.busy_s}

    def ping(self) -> bool:
        return True
