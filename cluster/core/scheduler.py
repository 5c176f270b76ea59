"""The scheduler (pure: no torch, no Ray): which requests are admitted where, which are verified this
step, and how much each one drafts.

Requests live here: a waiting queue and a running list. Workers are known by stable ids with a number of
slots; how loaded a worker is comes from the running requests pinned to it (never a separate count).
One `schedule()` call returns a StepPlan:
  1. admit waiting requests (and those moved off a dead worker) to the least-loaded live target;
  2. choose draft budgets with the cost model (or fixed K), bounded by what each request may still emit;
  3. where drafts can run beside verification (separate draft workers) and the cost model predicts it
     pays, either verify every request while its drafter drafts on from the end of its proposal
     (continue), or verify one group while the other drafts (split).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from cluster.core.cost_model import CostModel, expected_tokens
from cluster.core.messages import DraftTask, Prefill, StepPlan, VerifyTask


@dataclass
class SchedulerConfig:
    k: int  # fixed draft length, and the prior budget of new requests; 0: target-only decoding
    k_max: int
    adaptive: bool  # budgets from the cost model (False: always k)
    max_model_len: int
    prior_acceptance: float = 0.5
    min_gain: float = 0.03  # speculate only where the cost model predicts at least this much gain
    want_hidden: bool = False  # drafters that read the target's hidden states (parallel heads)
    probe_every: int = 16  # plain steps in a row before a probing draft (the cost model's fresh evidence)
    defer_prefill: bool = False  # new requests' prompts ride in their first verify pass (SpeculationConfig)


def context(seq) -> int:
    """Tokens in a request's target cache: all but the pending one (emitted, fed by the next pass); none
    while its prefill is deferred to its first verify pass."""
    return 0 if seq.deferred else max(len(seq.tokens) - 1, 0)


def uncached(seq) -> int:
    """Tokens its next verify pass feeds before the proposal: the pending one, or a deferred prompt."""
    return len(seq.tokens) - context(seq)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cost: CostModel | None = None, pipelining: str = "off"):
        self.config = config
        self.cost = cost
        # off | auto | split | continue (the last two forced); only where drafting runs on other workers,
        # concurrently with verification
        self.pipelining = pipelining
        self.waiting: deque = deque()
        self.running: list = []
        self.targets: dict[str, int] = {}  # live target workers: id -> slots
        self.drafters: dict[str, int] = {}  # live draft workers: id -> slots
        self.acceptance_prior = config.prior_acceptance
        self.plain_steps = 0  # steps in a row the cost model chose no draft at all

    # --- workers -----------------------------------------------------------------------------------
    def load(self, worker: str) -> int:
        """Requests pinned to a worker, derived from the running list."""
        return sum(1 for s in self.running if s.target == worker or s.drafter == worker)

    def pinned(self) -> set[str]:
        """Workers some running request is pinned to."""
        return {w for s in self.running for w in (s.target, s.drafter) if w is not None}

    def worker_lost(self, worker: str) -> list:
        """A worker died: forget it; return the requests that were pinned to it (target: they will be
        re-prefilled elsewhere; draft: they draft elsewhere from the next step)."""
        self.targets.pop(worker, None)
        self.drafters.pop(worker, None)
        moved = []
        for seq in self.running:
            if seq.target == worker:
                seq.target, seq.ready, seq.resume, seq.proposal, seq.deferred = None, False, True, None, False
                moved.append(seq)
            if seq.drafter == worker:
                seq.drafter, seq.draft_synced, seq.proposal = None, 0, None
                moved.append(seq)
        return moved

    def _least_loaded(self, pool: dict[str, int]) -> str | None:
        best, best_load = None, None
        for worker, slots in pool.items():
            load = self.load(worker)
            if load < slots and (best_load is None or load < best_load):
                best, best_load = worker, load
        return best

    # --- the plan ----------------------------------------------------------------------------------
    def schedule(self, in_flight: frozenset[str] = frozenset()) -> StepPlan:
        """`in_flight`: requests whose drafts from an earlier step are still running (the executor's)."""
        plan = StepPlan()
        self._admit(plan)
        self._assign_drafters()
        plan.draft += self._draft_beside_prefill(plan)
        decode = [s for s in self.running if s.ready and not s.finish_reason]
        if not decode:
            plan.predicted_s = self._predict(plan, [], {})
            return plan
        caps = [self.cap(s) for s in decode]
        if self.config.k == 0 or not self.drafters:
            ks = [0] * len(decode)
        elif not self.config.adaptive or self.cost is None:
            ks = [min(self.config.k, c) for c in caps]
        else:
            alphas = [s.acceptance.rate(self.acceptance_prior) for s in decode]
            contexts = [context(s) for s in decode]
            caps = self._unread(decode, caps, alphas, contexts)
            ks = self.cost.choose(alphas, caps, self.config.min_gain, contexts).ks
            ks = self._probe(ks, alphas, caps)
        budgets = {s.request_id: (k if s.drafter is not None else 0) for s, k in zip(decode, ks)}
        held = [s for s in decode if s.proposal is not None]
        # Drafted for this step and still running: verified now with that draft (the executor waits for
        # it), never drafted a second time.
        coming = [s for s in decode if s.proposal is None and s.request_id in in_flight]
        fresh = [s for s in decode if s.proposal is None and s.request_id not in in_flight]
        mode = self._pipeline(decode, budgets)
        if mode == "continue":
            budgets = self._continue_budgets(decode, budgets)
            # Everyone is verified: with the proposal it holds, the one on its way, or none (one token, a
            # row a memory-bound pass carries for free; the cost model rates that, _pipeline_rates); and
            # drafts on from there for the next step. A request drafts now instead where its prompt rides in
            # this pass (deferred), or, with a fixed K (K drafted tokens asked of every pass), where the pass
            # would carry no proposal at all (nothing held or coming: a lone request's pass is all its own).
            # It then drafts on from that draft, beside the verify.
            fixed = self.cost is None or not self.config.adaptive
            now = [s for s in fresh if budgets[s.request_id] > 0 and (s.deferred or fixed and not (held or coming))]
            self._verify(plan, held + coming + fresh, budgets, now=now)
            plan.draft += [t for t in (self._continue_task(s, budgets[s.request_id], s in now) for s in held + fresh)
                           if t]
            plan.pipelined = True
        elif mode == "split":
            # Verify those whose drafts exist or are on their way; with none, half the fresh ones draft now.
            split = 0 if held or coming else (len(fresh) + 1) // 2
            group, later = held + coming + fresh[:split], fresh[split:]
            self._verify(plan, group, budgets, now=fresh[:split])
            plan.draft += [self._draft_task(s, budgets[s.request_id], now=False) for s in later
                           if budgets[s.request_id] > 0]
            plan.pipelined = True
        else:
            self._verify(plan, decode, budgets, now=fresh)
        plan.predicted_s = self._predict(plan, decode, budgets)
        return plan

    def _unread(self, decode: list, caps: list[int], alphas: list[float], contexts: list[int]) -> list[int]:
        """A drafter's first call reads its request's whole prompt. Where that has not happened beside the
        prefill, it runs in series with the step: start those drafters only if it pays back over the tokens
        still to come (CostModel.reading_pays); otherwise they decode plain (caps 0)."""
        unread = {i for i, s in enumerate(decode) if s.drafter is not None and s.draft_synced == 0 and caps[i]}
        if not unread:
            return caps
        remaining = sum(max(s.params.max_tokens - len(s.output_ids), 0) for s in decode)
        read = sum(len(decode[i].tokens) for i in unread)
        if self.cost.reading_pays(alphas, caps, contexts, remaining, read, self.config.min_gain):
            return caps
        return [0 if i in unread else c for i, c in enumerate(caps)]

    def _probe(self, ks: list[int], alphas: list[float], caps: list[int]) -> list[int]:
        """After probe_every steps without a draft, draft once anyway (the likeliest request, the prior K):
        a plan of plain decoding produces no new evidence, so one slow first draft call, or acceptance
        that has since changed, would otherwise keep drafting off for good."""
        if any(ks) or not any(caps):
            self.plain_steps = 0
            return ks
        self.plain_steps += 1
        if self.plain_steps < self.config.probe_every:
            return ks
        self.plain_steps = 0
        best = max((i for i, c in enumerate(caps) if c), key=lambda i: alphas[i])
        return [min(self.config.k, caps[i]) if i == best else 0 for i in range(len(ks))]

    def cap(self, seq, ahead: int = 0) -> int:
        """Never draft past what the request may still emit, nor past the context (`ahead`: tokens it will
        have emitted before this draft is verified)."""
        remaining = seq.params.max_tokens - len(seq.output_ids) - ahead - 1
        room = self.config.max_model_len - len(seq.tokens) - ahead - 1
        return max(0, min(self.config.k_max, remaining, room))

    def _admit(self, plan: StepPlan) -> None:
        resumed = [s for s in self.running if s.resume and s.target is None]
        for seq in resumed:  # requests moved off a dead target first
            seq.target = self._least_loaded(self.targets)
            if seq.target is None:
                return
            plan.admit.append(Prefill(seq.request_id, seq.target, list(seq.tokens), seq.num_prompt, seq.params,
                                      seq.seed, resume=True, want_hidden=self.config.want_hidden))
        # Deferred: the drafter reads the prompt and drafts, and the target's first pass over the prompt
        # verifies that draft too (pipelined drafting guesses from a first token this would not emit).
        defer = self.config.defer_prefill  # (the engine refuses it with hidden-state drafters)
        while self.waiting:
            target = self._least_loaded(self.targets)
            if target is None:
                break
            seq = self.waiting.popleft()
            seq.target = target
            self.running.append(seq)  # from here on it counts in its target's load
            plan.admit.append(Prefill(seq.request_id, target, list(seq.tokens), seq.num_prompt, seq.params, seq.seed,
                                      want_hidden=self.config.want_hidden, defer=defer))

    def _draft_beside_prefill(self, plan: StepPlan) -> list[DraftTask]:
        """Where drafts run on their own workers, a new request's drafter reads its prompt while the target
        prefills it (not in its first decode step, in series with the verify), and drafts on from it:
        node 0 guesses the target's first token, so the request may hold a proposal for its first verify."""
        if self.pipelining == "off" or self.config.k == 0 or self.config.defer_prefill:
            return []  # (deferred: no prefill pass to draft beside; the first verify takes a draft made now)
        new = {a.seq_id for a in plan.admit if not a.resume}
        tasks = (self._continue_task(s, self.config.k) for s in self.running if s.request_id in new and s.drafter)
        return [t for t in tasks if t is not None]

    def _assign_drafters(self) -> None:
        if self.config.k == 0:
            return
        for seq in self.running:
            if seq.drafter is None and self.drafters:
                seq.drafter = self._least_loaded(self.drafters)

    def _draft_task(self, seq, budget: int, now: bool) -> DraftTask:
        return DraftTask(seq.request_id, seq.drafter, seq.draft_synced, seq.tokens[seq.draft_synced:], budget,
                         seq.params, seq.seed, seq.num_prompt, now, seq.last_accepted, seq.hidden)

    def _continue_task(self, seq, budget: int, after_draft: bool = False) -> DraftTask | None:
        """While a request is verified, its drafter drafts on from the end of the proposal it holds (or from
        its tokens, when it holds none; or, after_draft, from the draft it makes now, whose tokens the
        executor appends): node 0 guesses the target's next token. If all of the proposal is accepted and
        the guess is right, the request holds its next proposal when this step ends, so the drafter works
        while the target verifies, for the whole batch."""
        p = seq.proposal
        if budget <= 0 or (p is not None and not p.is_chain) or self.config.want_hidden:
            return None
        drafted = p.tokens if p is not None else []
        ahead = budget if after_draft else len(drafted)  # a draft made now is at most `budget` long
        budget = min(budget, self.cap(seq, ahead=ahead + 1))
        if budget <= 0:
            return None
        # The proposal's tokens ride along; feedback and hidden state belong to the verify not yet known.
        task = self._draft_task(seq, budget + 1, now=False)
        return replace(task, new_tokens=task.new_tokens + drafted, last_accepted=None, hidden=None, continues=True,
                       after_draft=after_draft)

    def _verify(self, plan: StepPlan, group: list, budgets: dict, now: list) -> None:
        plan.draft += [self._draft_task(s, budgets[s.request_id], now=True) for s in now if budgets[s.request_id] > 0]
        plan.verify += [VerifyTask(s.request_id, s.target, s.proposal, self.config.want_hidden) for s in group]

    def _pipeline(self, decode: list, budgets: dict) -> str:
        """flat (everyone drafts, then everyone is verified), split (one group verifies while the other
        drafts) or continue (split, and the verified group's drafters draft on from their proposals)."""
        if self.pipelining == "off" or not any(s.drafter is not None and self.cap(s) for s in decode):
            return "flat"
        if not any(budgets.values()):  # drafting does not pay flat; continue, its drafts behind the pass, may
            if self.pipelining == "split" or self.cost is None or not self.config.adaptive:
                return "flat"
            return "continue" if self.pipelining == "continue" or self._continue_pays(decode, budgets) else "flat"
        if self.pipelining == "continue":  # forced (tests that prove each path); one request continues too
            return "continue"
        if len(decode) < 2:  # nothing to split
            return "flat" if self.pipelining == "split" or self.cost is None else self._best(decode, budgets, "split")
        if self.pipelining == "split":
            return "split"
        return "flat" if self.cost is None else self._best(decode, budgets)

    def _continue_pays(self, decode: list, budgets: dict) -> bool:
        rates = self._pipeline_rates(decode, budgets)
        return rates["continue"] > (1 + self.config.min_gain) * rates["flat"]

    def _best(self, decode: list, budgets: dict, without: str = "") -> str:
        rates = self._pipeline_rates(decode, budgets)
        rates.pop(without, None)
        return max(rates, key=rates.get)

    def _continue_budgets(self, decode: list, budgets: dict) -> dict:
        """A continue step costs max(verify, draft), not their sum, so the K that is best flat (the cost
        model's choice) is not best here: with a 5-node draft at 1.4 verify passes, K = 3 keeps the
        target's pace and emits more per second. The best uniform K by the continue rate; fixed budgets
        (no cost model, or adaptive off) are kept as asked."""
        if self.cost is None or not self.config.adaptive:
            return budgets
        drafting = [s for s in decode if s.drafter is not None]
        options = [{**budgets, **{s.request_id: min(k, self.cap(s)) for s in drafting}}
                   for k in range(1, self.config.k_max + 1)]
        return max(options, key=lambda b: self._continue_rate(decode, b), default=budgets)

    def _continue_rate(self, decode: list, budgets: dict) -> float:
        """Predicted tokens per second of continue steps with these budgets (see _pipeline_rates)."""
        ks = [budgets[s.request_id] for s in decode]
        alphas = [s.acceptance.rate(self.acceptance_prior) for s in decode]
        _, verify, _ = self.cost.step_seconds(ks, [context(s) for s in decode])
        piped = self.cost.timer.predict(max(verify, self.cost.draft_seconds([k + 1 for k in ks if k])), 0.0)
        holds = [a / (a + 1 - a ** (k + 1)) if k else 0.0 for a, k in zip(alphas, ks)]
        held = sum(h * expected_tokens(a, k) + (1 - h) for h, a, k in zip(holds, alphas, ks))
        return held / max(piped, 1e-12)

    def _pipeline_rates(self, decode: list, budgets: dict) -> dict[str, float]:
        """Predicted steady-state tokens per second of each way to run the step.
        flat: a step costs draft + verify of everyone.
        split: one half verifies while the other drafts on its own workers: max(verify one half, draft
          the other) for half the tokens (on a memory-bound drafter half a batch drafts no faster).
        continue: everyone is verified while its drafter drafts on from the end of its proposal, one node
          more (the guess of the target's next token): max(verify, draft) for everyone. A request holding
          a proposal holds the next one with probability s = alpha^(k+1) (all accepted, guess right); one
          without emits one token and holds a proposal next step with probability alpha (the guess). Of
          that two-state chain a request holds a proposal alpha / (alpha + 1 - s) of its steps.
          Continue is rated at its own best budgets (_continue_budgets)."""
        ks = [budgets[s.request_id] for s in decode]
        alphas = [s.acceptance.rate(self.acceptance_prior) for s in decode]
        contexts = [context(s) for s in decode]
        tokens = [expected_tokens(a, k) for a, k in zip(alphas, ks)]
        flat, _, _ = self.cost.step_seconds(ks, contexts)
        half = len(decode) // 2
        _, verify_half, _ = self.cost.step_seconds(ks[:half], contexts[:half])
        split = self.cost.timer.predict(max(verify_half, self.cost.draft_seconds(ks[half:])), 0.0)
        return {"flat": sum(tokens) / max(flat, 1e-12), "split": sum(tokens[:half]) / max(split, 1e-12),
                "continue": self._continue_rate(decode, self._continue_budgets(decode, budgets))}

    def _predict(self, plan: StepPlan, decode: list, budgets: dict) -> float:
        if self.cost is None:
            return 0.0
        verified = [s for s in decode if s.request_id in {v.seq_id for v in plan.verify}]
        ks = [len(s.proposal) if s.proposal is not None else budgets[s.request_id] for s in verified]
        plan.predicted_tokens = sum(expected_tokens(s.acceptance.rate(self.acceptance_prior), k)
                                    for s, k in zip(verified, ks))
        verify = self.cost.pass_seconds(ks, [context(s) for s in verified])
        prefills = [len(a.tokens) for a in plan.admit if not a.defer]  # a prefill is a pass over the prompts
        prefills += [uncached(s) - 1 for s in verified if s.deferred]  # or rides in the first verify pass
        if prefills:
            verify += self.cost.prefill_seconds(len(prefills), sum(prefills))
        now = self.cost.draft_seconds([t.budget for t in plan.draft if t.now])
        later = self.cost.draft_seconds([t.budget for t in plan.draft if not t.now])
        plan.predicted_verify_s, plan.predicted_draft_s = verify, (max(later - verify, 0.0) + now)
        return self.cost.timer.predict(verify, plan.predicted_draft_s)
