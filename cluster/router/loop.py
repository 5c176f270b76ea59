"""The router: continuous batching over Ray worker actors, with drafts pipelined across request groups.

Each running request is in one of two phases: it has drafts in hand ("ready") or it needs drafting.
One `step()` reads top to bottom:
  1. admit: pin new requests to the least-loaded target replica and draft worker; prefill them;
     each joins whichever phase has fewer requests, so the two groups stay balanced;
  2. launch verification of the ready group: one batched call per target replica;
  3. launch drafting of the other group: one batched call per draft worker, running meanwhile;
  4. collect verification: append accepted tokens, stream, adapt K; verified requests need drafts;
  5. collect drafts (late ones are dropped: that request's next verify runs without drafts);
  6. retire finished requests and free their caches on every actor.
Pipelining pays only while drafting costs a real fraction of a verify pass: otherwise it just halves
how often each request is verified. So the router pipelines while the measured draft time is at least
`pipeline_min_draft_ratio` x the verify time, and otherwise (or with pipelining off) runs step 3 to
completion before step 2, verifying every request every step.
Per-step calls go straight to actors and carry token ids (plus q for sampled requests).
Faults: a dead draft worker costs only speed (its requests verify without drafts until a replacement
answers); a dead target replica's requests are re-prefilled on another from the tokens already emitted.
"""

from __future__ import annotations

import logging
import time

import ray
import torch
from ray.exceptions import RayActorError, RayError

from cluster.adaptive_k import fit_budget
from cluster.config import EngineConfig
from cluster.models.loader import load_tokenizer
from cluster.requests import RequestQueue, Sequence
from cluster.router.pools import WorkerPool
from cluster.types import TokenDelta
from cluster.workers.actors import start_draft_actor, start_target_actor
from cluster.workers.draft_worker import DraftItem
from cluster.workers.isolation import Failure
from cluster.workers.target_worker import PrefillItem, VerifyItem

log = logging.getLogger(__name__)

Draft = tuple[list[int], torch.Tensor | None]
NO_DRAFT: Draft = ([], None)
DraftCall = tuple[list[tuple[Sequence, int]], list[int], "ray.ObjectRef"]


class Router(RequestQueue):
    def __init__(self, config: EngineConfig, tokenizer=None):
        super().__init__(config)
        spec, limits, cluster = config.speculation, config.limits, config.cluster
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.target)
        self.slots = limits.max_batch_size  # per target replica (and per draft worker)
        self._capacity = limits.max_model_len + spec.k_max + 1  # a verify may run K+1 past the last token
        extra_eos = tuple({tokenizer.eos_token_id} - {None})
        self.drafts: WorkerPool | None = None
        self.targets = WorkerPool(
            "target", lambda i: start_target_actor(cluster.target_pool, config.target, self.slots, self._capacity,
                                                   extra_eos=extra_eos),
            cluster.target_pool.replicas,
        )
        info = ray.get(self.targets.handles[0].info.remote())  # vocabulary, context, EOS: from the model itself
        self.vocab_size = info["vocab_size"]
        if spec.k > 0:
            self.drafts = WorkerPool(
                "draft",
                lambda i: start_draft_actor(cluster.draft_pool, config.drafter, self.slots, self._capacity,
                                            self.vocab_size, eos_ids=tuple(info["eos_ids"])),
                cluster.draft_pool.replicas,
            )
        self._init_requests(tokenizer, self.vocab_size, info["max_context"], set(info["eos_ids"]),
                            config.drafter.kind if spec.k > 0 else "none")
        self._drafts: dict[str, Draft | None] = {}  # None: needs drafting
        if cluster.metrics_port:
            self.metrics.serve(cluster.metrics_port)
        self.steps = 0
        self.overhead_s = 0.0  # step wall time not spent computing on the target
        self._draft_ema = self._verify_ema = 0.0  # seconds per call, for the pipelining policy

    def wait_ready(self, timeout: float = 600.0) -> None:
        self.targets.wait_ready(timeout)
        if self.drafts is not None:
            self.drafts.wait_ready(timeout)

    @property
    def drafting(self) -> bool:
        return self.drafts is not None

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> list[TokenDelta]:
        start = time.perf_counter()
        deltas: list[TokenDelta] = []
        prefill_s = self._admit(deltas)  # 1
        if self.pipelining():
            self._balance_phases()
        else:  # draft everyone first: one verify group, the target waits for drafts
            self._collect_drafts(self._launch_drafts(self._needs_draft()))
        verify_calls = self._launch_verify([s for s in self.running if self._drafts[s.request_id] is not None])  # 2
        draft_calls = self._launch_drafts(self._needs_draft())  # 3
        verify_compute = self._collect_verify(verify_calls, deltas)  # 4
        self._collect_drafts(draft_calls)  # 5
        self._retire()  # 6
        overhead = max(0.0, time.perf_counter() - start - prefill_s - verify_compute)
        if verify_calls:
            self.steps += 1
            self.overhead_s += overhead
            self.metrics.step_seconds.labels("verify").observe(verify_compute)
            self.metrics.step_seconds.labels("overhead").observe(overhead)
            self._verify_ema = _ema(self._verify_ema, verify_compute)
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(len(self.running))
        return deltas

    def pipelining(self) -> bool:
        """Pipeline while drafts cost enough to be worth overlapping (measured, smoothed)."""
        cluster = self.config.cluster
        if not cluster.pipelining or self.drafts is None:
            return False
        return self._draft_ema >= cluster.pipeline_min_draft_ratio * self._verify_ema

    def _balance_phases(self) -> None:
        """Keep the two groups about equal: move extra requests that need drafts to verify without."""
        needs = self._needs_draft()
        ready = len(self.running) - len(needs)
        for seq in needs[: max(0, (len(needs) - ready) // 2)]:
            self._drafts[seq.request_id] = NO_DRAFT

    def _needs_draft(self) -> list[Sequence]:
        return [s for s in self.running if self._drafts[s.request_id] is None]

    def _admit(self, deltas: list[TokenDelta]) -> float:
        """Pin and prefill new requests; returns the seconds spent prefilling."""
        new: list[Sequence] = []
        while self.waiting:
            target = self.targets.least_loaded(limit=self.slots)
            if target < 0:
                break
            seq = self.waiting.popleft()
            seq.target = target
            self.targets.pinned[target] += 1
            if self.drafts is not None:
                seq.drafter = self.drafts.least_loaded(limit=self.slots, ready_only=False)
                if seq.drafter >= 0:
                    self.drafts.pinned[seq.drafter] += 1
            new.append(seq)
        if not new:
            return 0.0
        start = time.perf_counter()
        first = self._prefill(new, resume=False)
        prefill_s = time.perf_counter() - start
        for seq in new:
            if seq.request_id not in first:  # its replica died during prefill: it was re-queued
                continue
            self.running.append(seq)
            self._drafts[seq.request_id] = None  # needs drafting; _balance_phases splits the groups
            r = first[seq.request_id]
            if isinstance(r, Failure):
                deltas.append(self._fail(seq, r.message))
            else:
                deltas.append(self._emit(seq, [r.token], r.logprobs))
        return prefill_s

    def _prefill(self, seqs: list[Sequence], resume: bool) -> dict:
        """Prefill on each sequence's pinned replica; returns each one's Emitted or Failure."""
        calls = {}
        for replica in sorted({s.target for s in seqs}):
            group = [s for s in seqs if s.target == replica]
            items = [PrefillItem(s.request_id, s.tokens, s.num_prompt, s.params, s.seed, resume) for s in group]
            calls[replica] = (group, self.targets.handles[replica].prefill.remote(items))
        first: dict = {}
        for replica, (group, ref) in calls.items():
            try:
                for seq, r in zip(group, ray.get(ref)):
                    first[seq.request_id] = r
            except RayActorError:
                self._target_failed(replica, group_in_flight=group, resume=resume)
        return first

    def _launch_verify(self, ready: list[Sequence]) -> dict[int, tuple[list[Sequence], ray.ObjectRef]]:
        calls = {}
        for replica in sorted({s.target for s in ready}):
            group = [s for s in ready if s.target == replica]
            items = [VerifyItem(s.request_id, *self._drafts[s.request_id]) for s in group]
            calls[replica] = (group, self.targets.handles[replica].verify_timed.remote(items))
        return calls

    def _collect_verify(self, calls, deltas: list[TokenDelta]) -> float:
        """Apply verification results; returns the longest replica compute time of this step."""
        compute = 0.0
        for replica, (group, ref) in calls.items():
            try:
                results, busy = ray.get(ref)
            except RayActorError:
                self._target_failed(replica)
                continue
            compute = max(compute, busy)
            for seq, r in zip(group, results):
                draft = self._drafts[seq.request_id][0]
                self._drafts[seq.request_id] = None
                if isinstance(r, Failure):
                    deltas.append(self._fail(seq, r.message))
                    continue
                deltas.append(self._apply_verify(seq, draft, r.accepted, r.token, r.logprobs,
                                                 drafting=seq.drafter >= 0))
        return compute

    def _launch_drafts(self, needs: list[Sequence]) -> dict[int, DraftCall]:
        """One batched propose per draft worker; returns {worker: ((seq, k) pairs, tokens synced, ref)}."""
        calls, by_worker = {}, {}
        # These requests are verified together in one pass (with pipelining, as one of the two groups).
        ks = fit_budget([self.output.draft_len(s) for s in needs], self.config.speculation.verify_token_budget)
        for seq, k in zip(needs, ks):
            if k == 0 or seq.drafter < 0 or not self.drafts.is_ready(seq.drafter):
                self._drafts[seq.request_id] = NO_DRAFT  # verify without drafts: exact, just slower
                continue
            by_worker.setdefault(seq.drafter, []).append((seq, k))
        for worker, pairs in by_worker.items():
            items = [DraftItem(s.request_id, s.draft_synced, s.tokens[s.draft_synced:], k, s.params, s.seed,
                               s.num_prompt) for s, k in pairs]
            synced = [len(s.tokens) for s, _ in pairs]
            calls[worker] = (pairs, synced, self.drafts.handles[worker].propose.remote(items))
        return calls

    def _collect_drafts(self, calls) -> None:
        if not calls:
            return
        refs = [ref for _, _, ref in calls.values()]
        start = time.perf_counter()
        ray.wait(refs, num_returns=len(refs), timeout=self.config.cluster.draft_timeout_s)
        self.metrics.step_seconds.labels("draft_wait").observe(time.perf_counter() - start)
        for worker, (pairs, synced, ref) in calls.items():
            try:
                proposal = ray.get(ref, timeout=0)
                self._draft_ema = _ema(self._draft_ema, proposal.compute_s)
                if proposal.failed:
                    self.metrics.draft_failures.inc()
                for row, ((seq, k), n_synced) in enumerate(zip(pairs, synced)):
                    tokens = proposal.tokens[row][:k]  # never more than was asked for
                    q = proposal.q(row)
                    self._drafts[seq.request_id] = (tokens, None if q is None else q[: len(tokens)])
                    seq.draft_synced = n_synced
                continue
            except RayActorError:
                self._draft_failed(worker)
            except (RayError, TimeoutError) as e:  # a late or failed draft: this step goes without
                log.warning("draft worker %d: %s; verifying without drafts", worker, type(e).__name__)
            for seq, _ in pairs:
                self._drafts[seq.request_id] = NO_DRAFT
                seq.draft_synced = 0  # unknown state over there: resend everything next time

    # --- faults ---------------------------------------------------------------------------------
    def _draft_failed(self, worker: int) -> None:
        log.error("draft worker %d died; its requests verify without drafts until it is replaced", worker)
        self.metrics.failovers.labels("draft").inc()
        self.drafts.replace(worker)
        for seq in self.running:
            if seq.drafter == worker:
                seq.draft_synced = 0

    def _target_failed(self, replica: int, group_in_flight: list[Sequence] | None = None, resume: bool = True) -> None:
        """Move every request on a dead replica to live ones and re-prefill from the tokens emitted."""
        log.error("target replica %d died; re-prefilling its requests elsewhere", replica)
        self.metrics.failovers.labels("target").inc()
        self.targets.replace(replica)
        self.targets.pinned[replica] = 0
        moved = [s for s in self.running if s.target == replica]
        if group_in_flight and not resume:  # new requests whose prefill died: queue them again, first
            for seq in reversed(group_in_flight):
                self.waiting.appendleft(seq)
        if not moved:
            return
        for seq in moved:
            seq.target = self.targets.least_loaded(limit=self.slots)
            if seq.target < 0:  # no other replica ready: wait for the replacement
                self.targets.wait_ready()
                seq.target = self.targets.least_loaded(limit=self.slots)
            self.targets.pinned[seq.target] += 1
            self._drafts[seq.request_id] = NO_DRAFT  # anything in flight for it is gone
        self._prefill(moved, resume=True)

    # --- retire ---------------------------------------------------------------------------------
    def _retire(self) -> None:
        done = [s for s in self.running if s.finish_reason]
        if not done:
            return
        self.running = [s for s in self.running if not s.finish_reason]
        for seq in done:
            self._drafts.pop(seq.request_id, None)
            self.targets.pinned[seq.target] -= 1
            self.targets.handles[seq.target].release.remote([seq.request_id])
            if seq.drafter >= 0:
                self.drafts.pinned[seq.drafter] -= 1
                self.drafts.handles[seq.drafter].release.remote([seq.request_id])
            self._finished(seq)

    # --- state ----------------------------------------------------------------------------------
    def worker_loads(self) -> dict[str, list[dict]]:
        """Each actor's own account: sequences held, cache slots in use, compute time."""
        loads = {"target": ray.get([h.load.remote() for h in self.targets.handles])}
        if self.drafts is not None:
            loads["draft"] = ray.get([h.load.remote() for h in self.drafts.handles])
        return loads

    def target_utilization(self) -> float:
        """Fraction of wall time since start the target replicas spent computing (also exported)."""
        wall = time.perf_counter() - self._started
        busy = sum(load["busy_s"] for load in self.worker_loads()["target"])
        fraction = busy / (wall * len(self.targets))
        self.metrics.target_busy.set(fraction)
        return fraction

    def shutdown(self) -> None:
        for pool in (self.targets, self.drafts):
            for handle in pool.handles if pool is not None else []:
                ray.kill(handle)


def _ema(previous: float, value: float, weight: float = 0.2) -> float:
    return value if previous == 0.0 else (1 - weight) * previous + weight * value
