"""Runs a StepPlan on plain workers in this process: prefill, then drafts, then verification. With
`overlap`, drafts for the next step (pipelining's split and continue) run on a thread beside the
verify: in one process that pays where the verify mostly waits on something other than the CPU (an
offloaded target reading its weights from storage), so the engine turns it on only when asked."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from cluster.core.messages import DraftTask, StepPlan
from cluster.executors.base import StepResult, after_drafts, by_worker, draft_call, resolve_verify, take_drafts
from cluster.workers.draft_worker import DraftWorker
from cluster.workers.target_worker import TargetWorker


class LocalExecutor:
    def __init__(self, target: TargetWorker, drafter: DraftWorker | None, slots: int, overlap: bool = False):
        self.targets = {"target-0": target}
        self.drafters = {"draft-0": drafter} if drafter is not None else {}
        self.slots = slots
        self.overlaps = overlap and drafter is not None  # drafting can run beside verification
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="draft-beside") if self.overlaps else None

    def capacities(self, load=None, demand=None) -> tuple[dict[str, int], dict[str, int]]:
        """Every slot of this process's workers (load and demand matter only to shared pools)."""
        return {w: self.slots for w in self.targets}, {w: self.slots for w in self.drafters}

    def execute(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        start = time.perf_counter()
        for worker, items in by_worker(plan.admit, "target").items():
            for item, r in zip(items, self.targets[worker].prefill(items)):
                result.prefilled[item.seq_id] = r
        result.prefill_s = time.perf_counter() - start
        self._draft(result, [t for t in plan.draft if t.now])
        later = after_drafts([t for t in plan.draft if not t.now], result)
        beside = self._thread.submit(self._draft, result, later) if self._thread is not None and later else None
        for worker, tasks in by_worker(resolve_verify(plan, result.proposals), "target").items():
            verdicts, busy = self.targets[worker].verify_timed(tasks)
            result.verify_s = max(result.verify_s, busy)
            result.verify_busy[worker] = busy
            for task, v in zip(tasks, verdicts):
                result.verdicts[task.seq_id] = v
        if beside is not None:
            beside.result()  # the next step's drafts: this step ends when both are done
        elif later:
            self._draft(result, later)
        return result

    def _draft(self, result: StepResult, tasks: list[DraftTask]) -> None:
        for worker, group in by_worker(tasks, "drafter").items():
            drafted = self.drafters[worker].propose(group)
            result.draft_calls += draft_call(group, drafted.compute_s)
            result.draft_s += drafted.compute_s if any(t.now for t in group) else 0.0
            take_drafts(result, group, drafted, self.targets["target-0"].vocab_size)

    def pending_drafts(self) -> set[str]:
        """Drafts run inside the step here: none outlives it."""
        return set()

    def release(self, seq_id: str, target: str | None, drafter: str | None) -> None:
        if target in self.targets:
            self.targets[target].release([seq_id])
        if drafter in self.drafters:
            self.drafters[drafter].release([seq_id])

    def target_busy_s(self) -> float:
        return sum(t.busy_s for t in self.targets.values())

    def shutdown(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
