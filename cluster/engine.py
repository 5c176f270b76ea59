"""The in-process speculative decoding engine: the same workers the Ray router drives, called directly.

One `step()` reads top to bottom:
  1. admit waiting requests into free cache slots and prefill them in one ragged batch (first token);
  2. ask the draft worker for up to K tokens for every running request (K = 0: plain decoding);
  3. verify all drafts in one ragged target forward; the target worker applies the acceptance rule
     and rolls its caches back to the accepted length;
  4. append, check token-level stop conditions, emit token deltas; adapt K;
  5. free the caches of finished (or failed) requests.
A request whose pass raises fails alone (the workers isolate it); a failing drafter costs only speed.
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
from cluster.requests import RequestQueue, Sequence
from cluster.types import FinalDelta, SamplingParams, SpecStats, StreamDelta, TokenDelta
from cluster.workers.draft_worker import DraftItem, DraftWorker
from cluster.workers.isolation import Failure
from cluster.workers.target_worker import PrefillItem, TargetWorker, VerifyItem

log = logging.getLogger(__name__)

MAX_DRAFT_FAILURES = 3  # consecutive failed draft calls before the engine stops drafting

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
        target: TargetWorker | None = None,
    ):
        super().__init__(config)
        limits, spec = config.limits, config.speculation
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.target)
        capacity = limits.max_model_len + spec.k_max + 1  # a verify pass may run K+1 past the last token
        extra_eos = tuple({tokenizer.eos_token_id} - {None})
        if target is None:
            model = model if model is not None else load_model(config.target)
            target = TargetWorker(config.target, limits.max_batch_size, capacity, model=model, extra_eos=extra_eos)
        self.target = target
        self.drafter: DraftWorker | None = None
        if spec.k > 0:
            self.drafter = DraftWorker(config.drafter, limits.max_batch_size, capacity, self.target.vocab_size,
                                       drafter=drafter, eos_ids=tuple(self.target.eos_ids))
        self._init_requests(tokenizer, self.target.vocab_size, self.target.max_context, set(self.target.eos_ids),
                            config.drafter.kind if self.drafter is not None else "none")
        self.timings = EngineTimings()
        self.stats = SpecStats()
        self.draft_failures = 0

    @property
    def drafting(self) -> bool:
        return self.drafter is not None  # None after repeated drafter failures, too

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> list[TokenDelta]:
        deltas: list[TokenDelta] = []
        self._admit(deltas)  # 1
        if self.running:
            batch = list(self.running)
            drafts = self._draft(batch)  # 2
            start = time.perf_counter()
            results = self.target.verify([VerifyItem(s.request_id, d, q) for s, (d, q) in zip(batch, drafts)])  # 3
            self.timings.verify_s += time.perf_counter() - start
            for seq, (draft, _), r in zip(batch, drafts, results):  # 4
                if isinstance(r, Failure):
                    deltas.append(self._fail(seq, r.message))
                    continue
                self.stats.add(SpecStats(steps=1, drafted=len(draft), accepted=r.accepted))
                deltas.append(self._apply_verify(seq, draft, r.accepted, r.token, r.logprobs,
                                                 drafting=self.drafter is not None))
            self.timings.steps += 1
        self._retire()  # 5
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(len(self.running))
        return deltas

    def _admit(self, deltas: list[TokenDelta]) -> None:
        new = []
        while self.waiting and len(new) < self.target.runner.cache.num_free:
            new.append(self.waiting.popleft())
        if not new:
            return
        start = time.perf_counter()
        first = self.target.prefill([PrefillItem(s.request_id, s.tokens, s.num_prompt, s.params, s.seed)
                                     for s in new])
        self.timings.prefill_s += time.perf_counter() - start
        for seq, r in zip(new, first):
            self.running.append(seq)
            if isinstance(r, Failure):
                deltas.append(self._fail(seq, r.message))
            else:
                deltas.append(self._emit(seq, [r.token], r.logprobs))

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
                               ks[i], batch[i].params, batch[i].seed, batch[i].num_prompt) for i in rows]
            proposal = self.drafter.propose(items)
            for i in rows:
                batch[i].draft_synced = len(batch[i].tokens)
            drafts = list(none)
            for row, i in enumerate(rows):
                tokens = proposal.tokens[row][: ks[i]]
                if any(not 0 <= t < self.target.vocab_size for t in tokens):
                    raise ValueError("drafter proposed a token outside the vocabulary")
                q = proposal.q(row)
                drafts[i] = (tokens, None if q is None else q[: len(tokens)])
            if proposal.failed == len(items):
                raise RuntimeError("every draft in the batch failed")
            self.draft_failures = 0
            return drafts
        except Exception:
            self.draft_failures += 1
            self.metrics.draft_failures.inc()
            log.exception("drafter failed (%d in a row); verifying without drafts", self.draft_failures)
            for s in batch:
                s.draft_synced = 0  # its state may be partial: resend everything next time
            if self.draft_failures >= MAX_DRAFT_FAILURES:
                log.error("drafter disabled after %d failures: target-only decoding", self.draft_failures)
                self.drafter = None
                self.metrics.drafting.set(0)
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
        for seq in done:
            self._finished(seq)

    def target_utilization(self) -> float:
        """Fraction of wall time since start the target spent computing (also exported)."""
        fraction = self.target.busy_s / max(time.perf_counter() - self._started, 1e-9)
        self.metrics.target_busy.set(fraction)
        return fraction

    # --- convenience front ends -----------------------------------------------------------------
    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield this request's text deltas as steps complete; closing the iterator cancels the request."""
        seq = self.build(prompt, params)
        text = self.text_stream(seq)
        self.enqueue(seq)
        finished = False
        try:
            while not finished:
                for d in self.step():
                    if d.request_id == seq.request_id:
                        out = text.feed(d)
                        if text.stopped:
                            self.abort(seq.request_id, out.finish_reason)
                            out.stats = seq.stats
                        finished = isinstance(out, FinalDelta)
                        yield out
                        if finished:
                            break
        finally:
            if not finished:
                self.abort(seq.request_id)
