"""Runs a StepPlan on Ray actors: target workers and draft workers in pools with stable ids.

Drafts planned for the next step (`now` False) are launched beside this step's verification and may
still be running when the step ends: the next step waits for them only if it needs them. Per-step
calls go straight to actors (never through Serve handles) and carry token ids (plus q under the
rejection rule). A dead actor is replaced under a new id; the engine moves its requests.
"""

from __future__ import annotations

import logging
import pickle
import time

import ray
from ray.exceptions import RayActorError, RayError

from cluster.core.messages import StepPlan
from cluster.executors.base import StepResult, after_drafts, by_worker, draft_call, resolve_verify, take_drafts
from cluster.pools.manager import RouterReport
from cluster.workers.isolation import Failure

log = logging.getLogger(__name__)


class ActorPool:
    """Actors of one kind under stable ids ("target-0", ...). A replacement gets a new id; an actor is
    offered to the scheduler once it answers a ping."""

    def __init__(self, prefix: str, start, size: int, slots: int):
        self.prefix, self._start, self._next, self.slots = prefix, start, 0, slots
        self.handles: dict[str, object] = {}
        self._probes: dict[str, object] = {}
        self.restarts = 0
        for _ in range(size):
            self.spawn()

    def spawn(self) -> str:
        worker = f"{self.prefix}-{self._next}"
        self._next += 1
        self.handles[worker] = self._start()
        self._probes[worker] = self.handles[worker].ping.remote()  # model loading ends when ping answers
        return worker

    def ready(self) -> list[str]:
        if self._probes:
            done, _ = ray.wait(list(self._probes.values()), num_returns=len(self._probes), timeout=0)
            for worker, probe in list(self._probes.items()):
                if probe in done:
                    try:
                        ray.get(probe)
                        del self._probes[worker]
                    except RayError:
                        log.error("%s failed to start; replacing it", worker)
                        self.replace(worker)
        return [w for w in self.handles if w not in self._probes]

    def capacities(self) -> dict[str, int]:
        return {w: self.slots for w in self.ready()}

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while self._probes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sorted(self._probes)} did not become ready in {timeout:.0f}s")
            ray.wait(list(self._probes.values()), num_returns=len(self._probes), timeout=1.0)
            self.ready()

    def replace(self, worker: str) -> str:
        """Start a fresh actor under a new id; the dead one's id is gone for good."""
        log.warning("replacing %s", worker)
        handle = self.handles.pop(worker, None)
        self._probes.pop(worker, None)
        if handle is not None:
            try:
                ray.kill(handle)
            except Exception:  # already gone
                pass
        self.restarts += 1
        return self.spawn()

    def shutdown(self) -> None:
        for handle in self.handles.values():
            ray.kill(handle)
        self.handles.clear()


class RayExecutor:
    overlaps = True  # drafts run on draft actors, beside verification on target actors

    def __init__(self, targets, drafters, vocab: int, draft_timeout_s: float, shared=None):
        """targets, drafters: this router's own ActorPools, or, with `shared` (a PoolClient), the
        SharedPools of a pool manager that serves every router replica."""
        self.targets, self.drafters, self.shared = targets, drafters, shared
        self.vocab, self.draft_timeout_s = vocab, draft_timeout_s
        self._since_sync = [0.0, 0.0]  # step seconds, of which waiting on drafts, since the last report
        self._in_flight: dict[str, tuple] = {}  # worker -> (tasks, ref) of drafts for the next step
        self.count_bytes = False  # benchmarks: count the bytes each step sends to and gets from actors
        self.step_bytes: list[int] = []

    def capacities(self, load=None, demand: dict[str, int] | None = None) -> tuple[dict[str, int], dict[str, int]]:
        """Slots per live worker. With shared pools, this router's leases, after sending the manager
        what it holds (`load(worker)`) and what waits for a slot (`demand` per pool)."""
        if self.shared is not None and load is not None:
            pools = [pool for pool in (self.targets, self.drafters) if pool is not None]

            def report() -> RouterReport:  # after the last answer is applied: the leases in force now
                usage = {w: load(w) for pool in pools for w in pool.handles}
                held = {w: max(lease, usage[w]) for pool in pools for w, lease in pool.leases.items()}
                return RouterReport(usage, held, dict(demand or {}), *self._since_sync)

            gone, sent = self.shared.sync(report)
            for worker in gone:
                self._in_flight.pop(worker, None)  # scaled away: its requests draft elsewhere now
            if sent:
                self._since_sync = [0.0, 0.0]
        targets = self.targets.capacities()
        drafters = self.drafters.capacities() if self.drafters is not None else {}
        return targets, drafters

    def execute(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        start = time.perf_counter()
        prefill = {w: (items, self.targets.handles[w].prefill.remote(items))
                   for w, items in by_worker(plan.admit, "target").items() if w in self.targets.handles}
        now = {w: (tasks, self.drafters.handles[w].propose.remote(tasks))
               for w, tasks in by_worker([t for t in plan.draft if t.now], "drafter").items()
               if w in self.drafters.handles}
        # A worker with continuations of drafts made now gets its later call once those are in (below).
        behind = [t for t in plan.draft if not t.now]
        chained = {t.drafter for t in behind if t.after_draft}
        later = {w: (tasks, self.drafters.handles[w].propose.remote(tasks))
                 for w, tasks in by_worker([t for t in behind if t.drafter not in chained], "drafter").items()
                 if w in self.drafters.handles}
        needed = {t.seq_id for t in plan.verify if t.proposal is None}
        self._collect_drafts(result, {w: c for w, c in self._in_flight.items()
                                      if any(t.seq_id in needed for t in c[0])}, wait=True)
        self._in_flight = {w: c for w, c in self._in_flight.items() if not any(t.seq_id in needed for t in c[0])}
        self._collect_drafts(result, now, wait=True, launched=start)
        waited = time.perf_counter() - start
        result.draft_s = waited if now else 0.0
        for w, tasks in by_worker(after_drafts([t for t in behind if t.drafter in chained], result), "drafter").items():
            if w in self.drafters.handles:  # the drafts they continue are in: their tokens are known
                later[w] = (tasks, self.drafters.handles[w].propose.remote(tasks))
        verify = {w: (tasks, self.targets.handles[w].verify_timed.remote(tasks))
                  for w, tasks in by_worker(resolve_verify(plan, result.proposals), "target").items()
                  if w in self.targets.handles}
        for worker, (items, ref) in prefill.items():
            try:
                for item, r in zip(items, ray.get(ref)):
                    result.prefilled[item.seq_id] = r
            except RayActorError:
                self._lost(result, worker, [i.seq_id for i in items])
        result.prefill_s = time.perf_counter() - start
        for worker, (tasks, ref) in verify.items():
            try:
                verdicts, busy = ray.get(ref)
                result.verify_s = max(result.verify_s, busy)
                result.verify_busy[worker] = busy
                for task, v in zip(tasks, verdicts):
                    result.verdicts[task.seq_id] = v
            except RayActorError:
                self._lost(result, worker, [t.seq_id for t in tasks])
            except RayError as error:  # a bug in the worker beyond its own isolation: these fail alone
                log.error("verify call on %s failed: %s", worker, type(error).__name__)
                for task in tasks:
                    result.verdicts[task.seq_id] = Failure(f"{type(error).__name__} in the worker")
        self._in_flight.update(later)
        # Drafts that continue proposals verified now are the next step's proposals: the step waits for them
        # (it costs max(verify, draft), as the scheduler predicts); others it takes if they are done.
        continuing = {w: c for w, c in later.items() if any(t.continues for t in c[0])}
        self._collect_drafts(result, continuing, wait=True)
        self._collect_drafts(result, {w: c for w, c in self._in_flight.items() if w not in continuing}, wait=False)
        if self.count_bytes:
            sent = [plan.admit, plan.draft, resolve_verify(plan, result.proposals)]
            got = [result.prefilled, result.proposals, result.continued, result.verdicts]
            self.step_bytes.append(len(pickle.dumps(sent)) + len(pickle.dumps(got)))
        self._in_flight = {w: c for w, c in self._in_flight.items()
                           if not all(t.seq_id in result.proposals or t.seq_id in result.continued
                                      or t.seq_id in result.draft_failed for t in c[0])}
        self._since_sync[0] += time.perf_counter() - start
        self._since_sync[1] += waited
        return result

    def pending_drafts(self) -> set[str]:
        """Requests whose next-step drafts are still running."""
        return {t.seq_id for tasks, _ in self._in_flight.values() for t in tasks}

    def _collect_drafts(self, result: StepResult, calls: dict, wait: bool, launched: float | None = None) -> None:
        """Gather draft results. For drafts this step waits on, the cost model learns the whole call as
        the verify sees it (round trip included), not just the worker's compute."""
        if not calls:
            return
        refs = [ref for _, ref in calls.values()]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.draft_timeout_s if wait else 0)
        for worker, (tasks, ref) in calls.items():
            if ref not in done:
                if wait:  # too late for this step: go without; the worker may be out of step, so resend all
                    log.warning("drafts from %s are late; verifying without them", worker)
                    result.draft_failed.update(t.seq_id for t in tasks)
                continue
            try:
                drafted = ray.get(ref)
            except RayActorError:
                self._lost(result, worker, [])
                result.draft_failed.update(t.seq_id for t in tasks)
                continue
            except RayError:
                result.draft_failed.update(t.seq_id for t in tasks)
                continue
            seconds = time.perf_counter() - launched if launched is not None else drafted.compute_s
            result.draft_calls += draft_call(tasks, max(seconds, drafted.compute_s))
            take_drafts(result, tasks, drafted, self.vocab)

    def _lost(self, result: StepResult, worker: str, seq_ids: list[str]) -> None:
        if worker not in result.dead_workers:
            log.error("%s died; replacing it", worker)
            result.dead_workers.append(worker)
            pool = self.targets if worker in self.targets.handles else self.drafters
            pool.replace(worker)
            self._in_flight.pop(worker, None)
        result.lost.update(seq_ids)

    def release(self, seq_id: str, target: str | None, drafter: str | None) -> None:
        if target in self.targets.handles:
            self.targets.handles[target].release.remote([seq_id])
        if self.drafters is not None and drafter in self.drafters.handles:
            self.drafters.handles[drafter].release.remote([seq_id])

    def target_busy_s(self) -> float:
        return sum(load["busy_s"] for load in ray.get([h.load.remote() for h in self.targets.handles.values()]))

    def loads(self) -> dict[str, list[dict]]:
        loads = {"target": ray.get([h.load.remote() for h in self.targets.handles.values()])}
        if self.drafters is not None:
            loads["draft"] = ray.get([h.load.remote() for h in self.drafters.handles.values()])
        return loads

    def shutdown(self) -> None:
        self.targets.shutdown()
        if self.drafters is not None:
            self.drafters.shutdown()
