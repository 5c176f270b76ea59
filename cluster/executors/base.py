"""What an executor returns for one StepPlan, and the checks both executors share."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cluster.core.messages import DraftTask, Proposal, StepPlan, VerifyTask


@dataclass
class StepResult:
    prefilled: dict = field(default_factory=dict)  # seq_id -> Emitted | Failure
    proposals: dict = field(default_factory=dict)  # seq_id -> Proposal drafted this step (valid, or empty)
    continued: dict = field(default_factory=dict)  # seq_id -> (DraftTask, Proposal) of drafts that continue a proposal
    draft_failed: set = field(default_factory=set)  # seq_ids whose drafting failed (their worker resyncs them)
    verdicts: dict = field(default_factory=dict)  # seq_id -> Verdict | Failure
    dead_workers: list = field(default_factory=list)  # worker ids that died during the step
    lost: set = field(default_factory=set)  # seq_ids whose results were lost with a dead worker
    draft_calls: list = field(default_factory=list)  # (steps, nodes, read, seconds) per draft call: for the cost model
    verify_s: float = 0.0  # longest target compute in the step
    verify_busy: dict = field(default_factory=dict)  # target worker -> seconds its verify pass computed
    draft_s: float = 0.0  # draft compute the verify waited for
    prefill_s: float = 0.0


def clean(proposal: Proposal, vocab: int) -> Proposal | None:
    """A proposal the target can verify, or None: a malformed draft is a drafter failure, never a
    request failure."""
    try:
        proposal.validate(vocab)
    except ValueError:
        return None
    return proposal


def draft_call(tasks: list[DraftTask], seconds: float) -> list[tuple[int, int, int, float]]:
    """What the cost model learns from a draft call: (sequential steps, nodes, prompt tokens read, seconds).
    A call in which a drafter first read some request's whole prompt is mostly that read, a
    prefill: it teaches the drafter's read rate, not a draft's cost (the first calls set its scale)."""
    if not tasks:
        return []
    read = sum(len(t.new_tokens) for t in tasks if t.reads_prompt)
    return [(max(t.budget for t in tasks), sum(t.budget for t in tasks), read, seconds)]


def take_drafts(result: StepResult, tasks: list[DraftTask], drafted, vocab: int) -> None:
    """File one draft call's proposals: continuations aside (usable only once their verify is known: the
    engine decides), the others as this step's, malformed or failed ones as draft failures."""
    for task, proposal in zip(tasks, drafted.proposals):
        proposal = clean(proposal, vocab)
        if proposal is None or task.seq_id in drafted.failed:
            result.draft_failed.add(task.seq_id)
        elif task.continues:
            result.continued[task.seq_id] = (task, proposal)
        else:
            result.proposals[task.seq_id] = proposal


def by_worker(items: list, attr: str) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(getattr(item, attr), []).append(item)
    return groups


def resolve_verify(plan: StepPlan, proposals: dict) -> list[VerifyTask]:
    """Verify tasks with their proposals: held ones as planned, fresh ones from this step's drafts."""
    out = []
    for task in plan.verify:
        proposal = task.proposal if task.proposal is not None else proposals.get(task.seq_id, Proposal())
        out.append(VerifyTask(task.seq_id, task.target, proposal, task.want_hidden))
    return out


def after_drafts(tasks: list[DraftTask], result: StepResult) -> list[DraftTask]:
    """Tasks that continue a draft made now get its tokens appended; without one (it failed, or came back
    empty or as a tree) there is nothing to continue from and the task is dropped."""
    out = []
    for task in tasks:
        if not task.after_draft:
            out.append(task)
            continue
        drafted = result.proposals.get(task.seq_id)
        if drafted is not None and len(drafted) and drafted.is_chain:
            out.append(replace(task, new_tokens=task.new_tokens + drafted.tokens, after_draft=False))
    return out
