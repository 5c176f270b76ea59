"""The in-process speculative decoding engine: the same workers the Ray router drives, called directly.

One `step()` reads top to bottom:
  1. admit waiting requests into free cache slots and prefill them in one ragged batch (first token);
  2. ask the draft worker for up to K tokens for every running request (K = 0: plain decoding);
  3. verify all drafts in one ragged target forward; the target worker applies the acceptance rule
     and rolls its caches back to the accepted length;
  4. append, check stop conditions, stream; adapt K;
  5. free the caches of finished requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cluster.adaptive_k import fit_budget
from cluster.config import EngineConfig
from cluster.drafters.base import Drafter
from cluster.models.loader import load_model, load_tokenizer
from cluster.requests import RequestQueue, Sequence, eos_ids
from cluster.types import SamplingParams, SpecStats, StreamDelta
from cluster.workers.draft_worker import DraftItem, DraftWorker
from cluster.workers.target_worker import PrefillItem, TargetWorker, VerifyItem

log = logging.getLogger(__name__)

MAX_DRAFT_FAILURES = 3  # consecutive drafter errors before the engine stops drafting

__all__ = ["EngineTimings", "SpecEngine"]


@dataclass
class EngineTimings:
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    steps: int = 0


class SpecEngine(RequestQueue):
    def __init__(
        self,
        config: EngineConfig,
        *,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        drafter: Drafter | None = None,
    ):
        super().__init__(config)
        limits, spec = config.limits, config.speculation
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.target)
        model = model if model is not None else load_model(config.target)
        capacity = limits.max_model_len + spec.k_max + 1  # a verify pass may run K+1 past the last token
        self.target = TargetWorker(config.target, limits.max_batch_size, capacity, model=model)
        self.drafter: DraftWorker | None = None
        if spec.k > 0:
            self.drafter = DraftWorker(config.drafter, limits.max_batch_size, capacity, self.target.vocab_size,
                                       drafter=drafter)
        self._init_requests(tokenizer, self.target.vocab_size, self.target.max_context, eos_ids(model, tokenizer))
        self.timings = EngineTimings()
        self.stats = SpecStats()
        self.draft_failures = 0

    @property
    def drafting(self) -> bool:
        return self.drafter is not None  # None after repeated drafter failures, too

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        deltas: list[StreamDelta] = []
        self._admit(deltas)  # 1
        if self.running:
            batch = list(self.running)
            drafts = self._draft(batch)  # 2
            start = time.perf_counter()
            results = self.target.verify([VerifyItem(s.request_id, d, q) for s, (d, q) in zip(batch, drafts)])  # 3
            self.timings.verify_s += time.perf_counter() - start
            for seq, (draft, _), (n, token) in zip(batch, drafts, results):  # 4
                self.stats.add(SpecStats(steps=1, drafted=len(draft), accepted=n))
                deltas.append(self._apply_verify(seq, draft, n, token, drafting=self.drafter is not None))
            self.timings.steps += 1
        self._retire()  # 5
        return deltas

    def _admit(self, deltas: list[StreamDelta]) -> None:
        new = []
        while self.waiting and len(new) < self.target.runner.cache.num_free:
            new.append(self.waiting.popleft())
        if not new:
            return
        start = time.perf_counter()
        first = self.target.prefill([PrefillItem(s.request_id, s.tokens, s.params, s.seed) for s in new])
        self.timings.prefill_s += time.perf_counter() - start
        for seq, token in zip(new, first):
            self.running.append(seq)
            deltas.append(self.output.append(seq, [token]))

    def _draft(self, batch: list[Sequence]) -> list[tuple[list[int], torch.Tensor | None]]:
        """Up to K tokens per request, with q where the drafter has one. A failing drafter costs only speed."""
        none: list[tuple[list[int], torch.Tensor | None]] = [([], None) for _ in batch]
        ks = fit_budget([self.output.draft_len(s) for s in batch], self.config.speculation.verify_token_budget)
        rows = [i for i, k in enumerate(ks) if k > 0]
        if self.drafter is None or not rows:
            return none
        start = time.perf_counter()
        try:
            items = [DraftItem(batch[i].request_id, batch[i].draft_synced, batch[i].tokens[batch[i].draft_synced:],
                               ks[i], batch[i].params, batch[i].seed) for i in rows]
            proposal = self.drafter.propose(items)
            for i in rows:
                batch[i].draft_synced = len(batch[i].tokens)
            drafts = list(none)
            for row, i in enumerate(rows):
                tokens = proposal.tokens[row][: ks[i]]
                if any(not 0 <= t < self.target.vocab_size for t in tokens):
                    raise ValueError("drafter proposed a token outside the vocabulary")
                probs = None if proposal.probs is None else proposal.probs[row, : len(tokens)]
                drafts[i] = (tokens, probs)
            self.draft_failures = 0
            return drafts
        except Exception:
            self.draft_failures += 1
            log.exception("drafter failed (%d in a row); verifying without drafts", self.draft_failures)
            for s in batch:
                s.draft_synced = 0  # its state may be partial: resend everything next time
            if self.draft_failures >= MAX_DRAFT_FAILURES:
                log.error("drafter disabled after %d failures: target-only decoding", self.draft_failures)
                self.drafter = None
            return none
        finally:
            self.timings.draft_s += time.perf_counter() - start

    def _retire(self) -> None:
        done = [s for s in self.running if s.finish_reason]
        if not done:
            return
        self.running = [s for s in self.running if not s.finish_reason]
        ids = [s.request_id for s in done]
        self.target.release(ids)
        if self.drafter is not None:
            self.drafter.release(ids)

    # --- convenience front ends -----------------------------------------------------------------
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

