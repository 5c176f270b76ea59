"""Runs a StepPlan on plain workers in this process: prefill, then drafts, then verification."""

from __future__ import annotations

import time

from cluster.core.messages import StepPlan
from cluster.executors.base import StepResult, by_worker, clean, draft_call, resolve_verify
from cluster.workers.draft_worker import DraftWorker
from cluster.workers.target_worker import TargetWorker


class LocalExecutor:
    overlaps = False  # one process: drafting cannot run beside verification

    def __init__(self, target: TargetWorker, drafter: DraftWorker | None, slots: int):
        self.targets = {"target-0": target}
        self.drafters = {"draft-0": drafter} if drafter is not None else {}
        self.slots = slots

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
        for worker, tasks in by_worker(plan.draft, "drafter").items():
            drafted = self.drafters[worker].propose(tasks)
            result.draft_calls += draft_call(tasks, drafted.compute_s)
            result.draft_s += drafted.compute_s if any(t.now for t in tasks) else 0.0
            vocab = self.targets["target-0"].vocab_size
            for task, proposal in zip(tasks, drafted.proposals):
                proposal = clean(proposal, vocab)
                if proposal is None or task.seq_id in drafted.failed:
                    result.draft_failed.add(task.seq_id)
                    continue
                result.proposals[task.seq_id] = proposal
        for worker, tasks in by_worker(resolve_verify(plan, result.proposals), "target").items():
            verdicts, busy = self.targets[worker].verify_timed(tasks)
            result.verify_s = max(result.verify_s, busy)
            result.verify_busy[worker] = busy
            for task, v in zip(tasks, verdicts):
                result.verdicts[task.seq_id] = v
        return result

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
        pass
