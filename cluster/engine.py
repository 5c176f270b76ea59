"""The engine: one step loop for the in-process engine and the Ray router alike.

    step = schedule() -> executor.execute(plan) -> update(plan, result)

The Scheduler (pure) decides admissions, who is verified and how much each request drafts; the executor
runs the plan on workers (LocalExecutor: plain workers in this process; RayExecutor: actors, drafts
pipelined beside verification); `update` appends what was accepted, streams it, feeds the cost model and
the drafters, handles failures and retires finished requests. `SpecEngine` and `Router` are this loop
with one executor or the other.

Failures: a request whose pass raises fails alone; a failing drafter costs only speed (and drafting
stops after repeated whole-batch failures); a dead worker's requests move to live ones.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from cluster.config import EngineConfig
from cluster.core.cost_model import CostCurve, CostModel
from cluster.core.messages import StepPlan, Verdict, continuation
from cluster.core.scheduler import Scheduler, SchedulerConfig, context, uncached
from cluster.errors import ConfigError, EngineOverloadedError, InvalidRequestError
from cluster.metrics import EngineMetrics
from cluster.requests import OutputProcessor, RequestBuilder, Sequence, collect, longest_token_chars
from cluster.text import TextStream
from cluster.types import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FinalDelta,
    RequestLimits,
    RequestOutput,
    SamplingParams,
    SpecStats,
    StreamDelta,
    TokenDelta,
    TokenLogprob,
)
from cluster.workers.isolation import Failure

log = logging.getLogger(__name__)

MAX_DRAFT_FAILURES = 3  # consecutive steps whose every draft failed before drafting stops


@dataclass
class EngineTimings:
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    steps: int = 0


class Engine:
    def __init__(self, config: EngineConfig, executor, tokenizer, vocab_size: int, max_context: int | None,
                 eos: set[int], verify_curve: CostCurve | None, sequential_draft: bool):
        self.config, self.executor, self.tokenizer = config, executor, tokenizer
        limits, spec = config.limits, config.speculation
        self.vocab_size = vocab_size
        self.eos_ids = set(eos)
        self.max_model_len = min(limits.max_model_len, max_context or limits.max_model_len)
        request_limits = RequestLimits(limits.max_tokens, vocab_size, limits.max_stop_strings, limits.max_stop_chars)
        max_chars = limits.max_prompt_chars or self.max_model_len * longest_token_chars(tokenizer)
        self.requests = RequestBuilder(tokenizer, request_limits, self.max_model_len, max_chars)
        self.output = OutputProcessor(self.eos_ids, self.max_model_len)
        cost = CostModel(verify_curve, sequential_draft=sequential_draft) if verify_curve is not None else None
        from cluster.drafters.registry import DRAFTERS

        reads_hidden = spec.k > 0 and any(DRAFTERS[k].reads_hidden for k in config.drafter.kinds_in_use())
        pipelining = config.cluster.pipelining if executor.overlaps else "off"
        self.scheduler = Scheduler(SchedulerConfig(spec.k, spec.k_max, spec.adaptive, self.max_model_len,
                                                   spec.prior_acceptance, spec.min_gain, reads_hidden,
                                                   defer_prefill=spec.defer_prefill), cost,
                                   pipelining)
        self.metrics = EngineMetrics(config.drafter.kind if spec.k > 0 else "none")
        self.timings = EngineTimings()
        self.stats = SpecStats()
        self.draft_failures = 0
        self.step_errors: deque[float] = deque(maxlen=512)  # |predicted - measured| / measured, recent steps
        self.pipelined_steps = 0
        self._started = time.perf_counter()

    # --- requests ----------------------------------------------------------------------------------
    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def drafting(self) -> bool:
        return self.config.speculation.k > 0 and self.draft_failures < MAX_DRAFT_FAILURES

    def build(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> Sequence:
        """Validate and tokenise a request without touching engine state (safe from any thread)."""
        return self.requests.build(prompt, params or self.default_params(), request_id)

    def enqueue(self, seq: Sequence) -> str:
        """Queue a built request; it joins the batch at the next step."""
        if len(self.waiting) >= self.config.limits.max_waiting:
            raise EngineOverloadedError(f"{len(self.waiting)} requests already waiting")
        seq.arrival = time.perf_counter()
        self.waiting.append(seq)
        return seq.request_id

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        return self.enqueue(self.build(prompt, params, request_id))

    def default_params(self, **overrides) -> SamplingParams:
        d = self.config.sampling
        max_tokens = min(d.max_tokens, self.config.limits.max_tokens)  # a default never breaks the limit
        base = dict(max_tokens=max_tokens, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)
        return SamplingParams(**{**base, **overrides})

    def text_stream(self, seq: Sequence) -> TextStream:
        return TextStream(self.tokenizer, seq.request_id, seq.params, seq.num_prompt, seq.seed)

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

    # --- the step ----------------------------------------------------------------------------------
    def step(self) -> list[TokenDelta]:
        start = time.perf_counter()
        demand = {"target": len(self.waiting), "draft": len(self.waiting) + sum(s.drafter is None for s in self.running)}
        targets, drafters = self.executor.capacities(self.scheduler.load, demand)
        for worker in self.scheduler.pinned() - targets.keys() - drafters.keys():
            self.scheduler.worker_lost(worker)  # left the pool (scaled away, or replaced by another router)
        self.scheduler.targets = targets
        self.scheduler.drafters = drafters if self.drafting else {}
        plan = self.scheduler.schedule(frozenset(self.executor.pending_drafts()))
        if plan.empty:
            return []
        result = self.executor.execute(plan)
        passes = self._pass_shapes(plan, result)  # before update: the contexts the passes saw
        deltas = self._update(plan, result)
        self._measure(plan, result, time.perf_counter() - start, passes)
        return deltas

    def _pass_shapes(self, plan: StepPlan, result) -> list[tuple[int, int, int, float]]:
        """(rows, tokens, kv, seconds) of each target worker's verify pass this step."""
        shapes: dict[str, list[int]] = {}
        for task in plan.verify:
            seq = self._seq(task.seq_id)
            if seq is None or task.target not in result.verify_busy:
                continue
            proposal = task.proposal if task.proposal is not None else result.proposals.get(task.seq_id)
            n = uncached(seq) + (len(proposal) if proposal else 0)
            shape = shapes.setdefault(task.target, [0, 0, 0])
            shape[0], shape[1], shape[2] = shape[0] + 1, shape[1] + n, shape[2] + context(seq) + n
        return [(*shape, result.verify_busy[w]) for w, shape in shapes.items() if result.verify_busy[w] > 0]

    def _update(self, plan: StepPlan, result) -> list[TokenDelta]:
        deltas: list[TokenDelta] = []
        for worker in result.dead_workers:
            self.metrics.failovers.labels("target" if worker.startswith("target") else "draft").inc()
            for seq in self.scheduler.worker_lost(worker):
                if not seq.ready and not seq.resume and seq in self.running:  # its first prefill was lost
                    self.running.remove(seq)
                    seq.target = seq.drafter = None
                    self.waiting.appendleft(seq)
        for item in plan.admit:
            seq = self._seq(item.seq_id)
            r = result.prefilled.get(item.seq_id)
            if seq is None or r is None:
                continue  # lost with its worker: re-queued or resumed above
            if isinstance(r, Failure):
                deltas.append(self._fail(seq, r.message))
            elif item.resume or item.defer:
                seq.ready, seq.resume, seq.hidden, seq.deferred = True, False, None, item.defer
            else:
                seq.ready, seq.hidden = True, r.hidden
                deltas.append(self._emit(seq, [r.token], r.logprobs))
        for task in plan.draft:
            seq = self._seq(task.seq_id)
            if seq is None:
                continue
            proposal = None if task.continues else result.proposals.get(task.seq_id)  # continued: below
            if proposal is not None:
                seq.draft_synced = task.start + len(task.new_tokens)
                if not task.now:
                    seq.proposal = proposal
            elif task.seq_id in result.draft_failed or task.now:
                seq.draft_synced = 0
        self._count_draft_failures(plan.draft, result)
        for task in plan.verify:
            seq = self._seq(task.seq_id)
            v = result.verdicts.get(task.seq_id)
            if seq is None or v is None:
                continue
            proposal = task.proposal if task.proposal is not None else result.proposals.get(task.seq_id)
            seq.proposal, seq.deferred = None, False
            if isinstance(v, Failure):
                seq.hidden = None
                deltas.append(self._fail(seq, v.message))
                continue
            seq.hidden = v.hidden
            deltas.append(self._apply(seq, len(proposal) if proposal else 0, v,
                                      proposal.path_tokens(v.path) if proposal else []))
        for seq_id, (task, drafted) in result.continued.items():  # after the verdicts they depend on
            seq = self._seq(seq_id)
            nxt = continuation(seq.tokens, task, drafted) if seq is not None and seq.proposal is None else None
            self.metrics.continued.labels("used" if nxt is not None else "dropped").inc()
            if nxt is not None:
                seq.proposal = nxt
                seq.draft_synced = task.start + len(task.new_tokens)
        self._retire()
        return deltas

    def _apply(self, seq: Sequence, drafted: int, v: Verdict, accepted_tokens: list[int]) -> TokenDelta:
        """Record one verify pass of `seq` (stats, acceptance, metrics) and append what it emitted."""
        stats = SpecStats(steps=1, drafted=drafted, accepted=v.accepted)
        seq.stats.add(stats)
        self.stats.add(stats)
        if drafted:
            seq.acceptance.observe(drafted, v.accepted)
            seq.last_accepted = v.accepted
        self.metrics.observe_verify(drafted, v.accepted)
        return self._emit(seq, accepted_tokens + [v.token], v.logprobs)

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

    def _fail(self, seq: Sequence, message: str) -> TokenDelta:
        """Fail one request alone: it is retired (its caches freed) at the end of the step."""
        log.error("request %s failed: %s", seq.request_id, message)
        seq.finish_reason, seq.error = FINISH_ERROR, message
        self.metrics.errors.inc()
        return self.output.final(seq, [], None)

    def _count_draft_failures(self, drafted, result) -> None:
        """Drafting stops (loudly) after MAX_DRAFT_FAILURES steps in a row in which every draft failed."""
        if not drafted:
            return
        failed = [t for t in drafted if t.seq_id in result.draft_failed]
        if failed:
            self.metrics.draft_failures.inc(len(failed))
        if len(failed) < len(drafted):
            self.draft_failures = 0
            return
        self.draft_failures += 1
        log.warning("every draft failed this step (%d in a row); verifying without drafts", self.draft_failures)
        if self.draft_failures >= MAX_DRAFT_FAILURES:
            log.error("drafting disabled after %d failed steps: target-only decoding", self.draft_failures)
            self.metrics.drafting.set(0)

    def _retire(self) -> None:
        done = [s for s in self.running if s.finish_reason]
        if not done:
            return
        self.scheduler.running = [s for s in self.running if not s.finish_reason]
        for seq in done:
            self.executor.release(seq.request_id, seq.target, seq.drafter)
            self.metrics.requests.labels(seq.finish_reason).inc()
            n = len(seq.output_ids)
            if seq.first_token_at is not None and n > 1:
                self.metrics.tpot.observe((time.perf_counter() - seq.first_token_at) / (n - 1))

    def _seq(self, request_id: str) -> Sequence | None:
        return next((s for s in self.running if s.request_id == request_id), None)

    # --- measuring ---------------------------------------------------------------------------------
    def _measure(self, plan: StepPlan, result, measured: float, passes: list) -> None:
        self.timings.steps += 1
        self.timings.prefill_s += result.prefill_s
        self.timings.draft_s += result.draft_s
        self.timings.verify_s += result.verify_s
        self.pipelined_steps += plan.pipelined
        cost = self.scheduler.cost
        if cost is None:
            return
        for steps, nodes, read, seconds in result.draft_calls:
            if read:
                cost.observe_draft_read(read, seconds - cost.draft(steps, nodes))
            else:
                cost.draft.observe(steps, nodes, seconds)
        for shape in passes:
            cost.observe_pass(*shape)
        verdicts = [v for v in result.verdicts.values() if isinstance(v, Verdict)]
        if verdicts and plan.predicted_tokens > len(plan.verify):
            cost.observe_tokens(plan.predicted_tokens - len(plan.verify), sum(v.accepted for v in verdicts))
        prefilled = [a for a in plan.admit if not a.defer]  # a deferred one ran no pass
        if prefilled:
            cost.observe_prefill(sum(len(a.tokens) for a in prefilled), result.prefill_s)
        if plan.predicted_s > 0:
            self.step_errors.append(abs(plan.predicted_s - measured) / measured)
            self.metrics.step_predicted.observe(plan.predicted_s)
        self.metrics.step_measured.observe(measured)
        # A step with prefills, or whose drafter first read a prompt (2.5 s of a 3.3 s step at 8 streams on
        # the Qwen pair), is mostly prefill: it says little about the overhead.
        if not plan.admit and not any(t.reads_prompt for t in plan.draft):
            cost.timer.observe(plan.predicted_verify_s, plan.predicted_draft_s, measured)
        self.metrics.step_time_error.set(self.step_time_error())
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(len(self.running))
        if self.stats.drafted >= 20:  # new requests start from the drafter's measured acceptance
            self.scheduler.acceptance_prior = min(max(self.stats.acceptance_rate, 0.02), 0.98)

    def step_time_error(self) -> float:
        """Median relative error of the predicted step time over recent steps."""
        return statistics.median(self.step_errors) if self.step_errors else 0.0

    def target_utilization(self) -> float:
        """Fraction of wall time since start the target workers spent computing (also exported)."""
        workers = max(len(self.scheduler.targets), 1)
        fraction = self.executor.target_busy_s() / max((time.perf_counter() - self._started) * workers, 1e-9)
        self.metrics.target_busy.set(fraction)
        return fraction

    def shutdown(self) -> None:
        self.executor.shutdown()


class SpecEngine(Engine):
    """The loop on plain workers in this process."""

    def __init__(self, config: EngineConfig, *, model=None, tokenizer=None, drafter=None, target=None):
        from cluster.drafters.registry import DRAFTERS, BuildContext
        from cluster.executors.local import LocalExecutor
        from cluster.models.loader import load_model, load_tokenizer
        from cluster.workers.draft_worker import DraftWorker
        from cluster.workers.target_worker import TargetWorker

        limits, spec = config.limits, config.speculation
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.target)
        capacity = limits.max_model_len + spec.k_max + 1  # a verify pass may run K+1 past the last token
        extra_eos = tuple({tokenizer.eos_token_id} - {None})
        if target is None:
            model = model if model is not None else load_model(config.target)
            target = TargetWorker(config.target, limits.max_batch_size, capacity, model=model, extra_eos=extra_eos,
                                  rule=spec.rule)
        self.target = target
        self.drafter = None
        if spec.k > 0:
            context = BuildContext(limits.max_batch_size, capacity, target.vocab_size, str(target.backend.device),
                                   eos_ids=tuple(target.eos_ids), rule=spec.rule, target=config.target,
                                   target_model=target.backend.model,
                                   sections=config.drafter.sections)
            self.drafter = DraftWorker(config.drafter.kind, config.drafter.section, context, drafter=drafter)
        # The cost model is measured only where the scheduler uses it: adaptive budgets (in one process
        # nothing pipelines). A fixed K needs no curve, and the grid costs seconds per engine.
        curve = target.calibrate() if spec.calibrate and spec.k > 0 and spec.adaptive else None
        sequential = self.drafter is not None and DRAFTERS[config.drafter.kind].model_based
        # In one process the draft and the target share the CPU: drafting beside the verify pays only where the
        # verify waits on something else (storage), so it runs only when pipelining is set to split or continue.
        overlap = config.cluster.pipelining in ("split", "continue")
        executor = LocalExecutor(target, self.drafter, limits.max_batch_size, overlap=overlap)
        super().__init__(config, executor, tokenizer,
                         target.vocab_size, target.max_context, set(target.eos_ids), curve, sequential)
        if hasattr(target.backend, "reader"):  # an offloaded target: what it reads is part of the story
            self.metrics.watch_storage(target.backend)
