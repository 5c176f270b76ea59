"""The cost model and the scheduler, without models or Ray."""

import random
from collections import deque

import pytest
import torch

from cluster.core.cost_model import Acceptance, CostCurve, CostModel, DraftCost, StepTimer, expected_tokens
from cluster.core.messages import DraftTask, Proposal, SparseQ, continuation
from cluster.core.scheduler import Scheduler, SchedulerConfig
from cluster.executors.base import StepResult, after_drafts, draft_call
from cluster.requests import Sequence
from cluster.types import SamplingParams


def test_curve_fit_recovers_a_linear_cost():
    truth = CostCurve(0.03, 0.001, 0.0005, 0.00002)
    samples = [(r, r * t, r * (c + t), truth(r, r * t, r * (c + t))) for r in (1, 2, 4, 8) for t in (1, 2, 4, 8)
               for c in (64, 512)]
    fitted = CostCurve.fit(samples)
    assert (fitted.a, fitted.b, fitted.c, fitted.d) == pytest.approx((0.03, 0.001, 0.0005, 0.00002), rel=1e-6)
    assert max(fitted.relative_errors()) < 1e-6
    no_context = CostCurve.fit([(r, t, kv, s - 0.00002 * kv) for r, t, kv, s in samples])
    assert no_context.d == 0.0 and no_context.c == pytest.approx(0.0005)  # a term is never negative


def test_the_curve_follows_measured_passes():
    """Refitted from real passes, the curve learns a cost the start grid did not show (here: the context)."""
    start = CostCurve.fit([(r, r * t, r * (64 + t), 0.01 + 0.001 * r * t) for r in (1, 4, 16) for t in (1, 4)])
    model = CostModel(start)
    assert model.pass_seconds([0] * 32, [600] * 32) == pytest.approx(0.01 + 0.032, rel=1e-6)
    for i in range(CostModel.REFIT_EVERY):
        rows = 8 + i
        model.observe_pass(rows, rows, rows * 601, 0.01 + 0.001 * rows + 0.00001 * rows * 601)
    assert model.pass_seconds([0] * 32, [600] * 32) == pytest.approx(0.01 + 0.032 + 0.00001 * 32 * 601, rel=0.05)


def test_the_curve_is_refitted_every_refit_every_passes_also_once_the_window_is_full():
    """Counting the window's length refitted on every pass once it was full: 15 ms of Python a step, which
    made speculative MEGABYTE slower than plain decoding."""
    model = CostModel(CostCurve(0.01, 0.0, 0.001))
    fits = 0
    for i in range(3 * model.measured.maxlen):
        before = model.verify
        model.observe_pass(4, 8, 4 * 300, 0.02 + 0.0001 * (i % 7))
        fits += model.verify is not before
    assert fits == 3 * model.measured.maxlen // CostModel.REFIT_EVERY


def test_step_timer_learns_the_overhead_and_keeps_the_curves_scale():
    timer, rng = StepTimer(), random.Random(0)
    for _ in range(300):
        verify, draft = rng.uniform(0.01, 0.1), rng.uniform(0.0, 0.05)
        timer.observe(verify, draft, 0.004 + verify + draft + rng.uniform(-0.001, 0.001))
    assert timer.predict(0.05, 0.02) == pytest.approx(0.004 + 0.05 + 0.02, abs=1e-3)
    # Drafting correlated with a verify curve that reads low: the error stays overhead, drafts are not blamed.
    timer = StepTimer()
    for _ in range(300):
        verify = rng.uniform(0.05, 0.1)
        timer.observe(verify, 0.1 * verify, 1.1 * verify + 0.1 * verify)
    assert timer.predict(0.075, 0.0075) - timer.predict(0.075, 0.0) == pytest.approx(0.0075)


def test_acceptance_counts_trials_until_the_first_rejection():
    a = Acceptance()
    a.observe(drafted=4, accepted=4)  # 4 successes, no rejection
    a.observe(drafted=4, accepted=1)  # 1 success, then a rejection
    assert (a.accepted, a.trials) == (5, 6)
    assert a.rate(prior=0.5, strength=0) == pytest.approx(5 / 6)
    assert Acceptance().rate(prior=0.3) == pytest.approx(0.3)


def test_budgets_never_predicted_slower_than_plain_decoding():
    rng = random.Random(1)
    for _ in range(200):
        curve = CostCurve(rng.uniform(0.001, 0.05), rng.uniform(0, 0.002), rng.uniform(0, 0.01))
        model = CostModel(curve, DraftCost(rng.uniform(0, 0.01), rng.uniform(0, 0.01), rng.uniform(0, 0.005)),
                          sequential_draft=rng.random() < 0.5)
        alphas = [rng.random() for _ in range(rng.randint(1, 32))]
        caps = [rng.randint(0, 8) for _ in alphas]
        plan = model.choose(alphas, caps)
        plain_step, _, _ = model.step_seconds([0] * len(alphas))
        assert all(0 <= k <= c for k, c in zip(plan.ks, caps))
        assert plan.tokens / plan.step_s >= len(alphas) / plain_step - 1e-9
        assert plan.tokens == pytest.approx(sum(expected_tokens(a, k) for a, k in zip(alphas, plan.ks)))


def test_budgets_follow_cost_and_acceptance():
    cheap_verify = CostModel(CostCurve(0.05, 0.0, 0.0001), DraftCost(0.0, 0.0, 0.0))  # memory-bound: drafts ~free
    assert cheap_verify.choose([0.9, 0.9], [8, 8]).ks == [8, 8]
    assert cheap_verify.choose([0.9, 0.0], [8, 8]).ks == [8, 0]  # a request whose drafts never pass drafts nothing
    compute_bound = CostModel(CostCurve(0.0, 0.0, 0.01), DraftCost(0.0, 0.0, 0.0))  # every token costs a pass
    assert compute_bound.choose([0.5] * 16, [8] * 16).ks == [0] * 16
    pricey_draft = CostModel(CostCurve(0.05, 0.0, 0.0001), DraftCost(0.0, 0.05, 0.0), sequential_draft=True)
    ks = pricey_draft.choose([0.6], [8]).ks
    assert 0 <= ks[0] <= 2  # each draft step costs a verify pass: short drafts at most


def _seq(i: int, max_tokens: int = 50, output: int = 0) -> Sequence:
    tokens = list(range(10 + output))
    seq = Sequence(f"r{i}", SamplingParams(max_tokens=max_tokens), i, tokens, 10)
    return seq


def _decoding(sched: Scheduler, seqs: list[Sequence]) -> list[Sequence]:
    """One target and one draft worker with 8 slots each, `seqs` prefilled and pinned to them."""
    sched.targets, sched.drafters = {"target-0": 8}, {"draft-0": 8}
    for s in seqs:
        s.ready, s.target, s.drafter = True, "target-0", "draft-0"
    sched.running = seqs
    return seqs


def test_scheduler_admits_by_derived_load_and_moves_requests_off_a_dead_worker():
    sched = Scheduler(SchedulerConfig(k=3, k_max=8, adaptive=False, max_model_len=64))
    sched.targets, sched.drafters = {"target-0": 2, "target-1": 2}, {"draft-0": 4}
    sched.waiting = deque(_seq(i) for i in range(5))
    plan = sched.schedule()
    assert sorted(a.target for a in plan.admit) == ["target-0", "target-0", "target-1", "target-1"]
    assert len(sched.waiting) == 1 and sched.load("target-0") == 2 and sched.load("draft-0") == 4
    for seq in sched.running:
        seq.ready = True
    plan = sched.schedule()
    assert not plan.admit and len(plan.verify) == 4 and all(t.budget == 3 and t.now for t in plan.draft)
    moved = sched.worker_lost("target-1")
    assert len(moved) == 2 and all(s.resume and s.target is None for s in moved)
    sched.targets["target-2"] = 2
    plan = sched.schedule()
    assert [(a.target, a.resume) for a in plan.admit] == [("target-2", True), ("target-2", True)]


def test_budgets_stop_at_what_a_request_may_still_emit():
    sched = Scheduler(SchedulerConfig(k=6, k_max=8, adaptive=False, max_model_len=20))
    sched.targets, sched.drafters = {"target-0": 4}, {"draft-0": 4}
    a, b = _seq(0, max_tokens=3, output=1), _seq(1, max_tokens=50, output=6)  # b: 16 of 20 context used
    for s in (a, b):
        s.ready, s.target, s.drafter = True, "target-0", "draft-0"
    sched.running = [a, b]
    plan = sched.schedule()
    assert {t.seq_id: t.budget for t in plan.draft} == {"r0": 1, "r1": 3}


def test_pipelining_splits_the_batch_when_drafting_costs_a_real_share():
    # Compute-bound (a CPU): every token costs, in verification and in drafting alike.
    slow_draft = CostModel(CostCurve(0.002, 0.0, 0.004), DraftCost(0.0, 0.0, 0.004))
    sched = Scheduler(SchedulerConfig(k=3, k_max=8, adaptive=False, max_model_len=256), slow_draft, pipelining="auto")
    seqs = _decoding(sched, [_seq(i) for i in range(4)])
    plan = sched.schedule()
    assert plan.pipelined
    now, later = [t.seq_id for t in plan.draft if t.now], [t.seq_id for t in plan.draft if not t.now]
    assert len(now) == 2 and len(later) == 2 and {v.seq_id for v in plan.verify} == set(now)
    for s in seqs:  # next step: the drafted-for-later group holds proposals and is verified
        if s.request_id in later:
            s.proposal = Proposal.chain([1, 2, 3])
    plan = sched.schedule()
    assert {v.seq_id for v in plan.verify} == set(later) and {t.seq_id for t in plan.draft} == set(now)
    free_draft = CostModel(CostCurve(0.05, 0.0, 0.0005), DraftCost(0.0, 0.0, 0.0))
    sched.cost = free_draft
    for s in seqs:
        s.proposal = None
    assert not sched.schedule().pipelined  # free drafts: one group, verified every step
    sched.pipelining = "split"
    assert sched.schedule().pipelined  # forced: split even though it does not pay
    sched.pipelining = "off"
    for s in seqs:
        s.proposal = None
    sched.cost = slow_draft
    assert not sched.schedule().pipelined  # off: never, even where it pays


def test_a_continuation_holds_only_on_the_tokens_it_assumed():
    """A draft made on from a held proposal [5, 6] guesses the target's next token (7) first; it is the next
    proposal only if the request then emitted exactly 5, 6, 7 after the tokens it was synced to."""
    task = DraftTask("r", "draft-0", 3, [4, 5, 6], 4, SamplingParams(), 0, 2, now=False, continues=True)
    drafted = Proposal.chain([7, 8, 9, 10], q=None)
    assert continuation([1, 2, 3, 4, 5, 6, 7], task, drafted).tokens == [8, 9, 10]
    assert continuation([1, 2, 3, 4, 5, 6, 8], task, drafted) is None  # the target's token was not the guess
    assert continuation([1, 2, 3, 4, 5, 9], task, drafted) is None  # the proposal was cut at 6
    assert continuation([1, 2, 3, 4, 5, 6, 7, 8], task, drafted) is None  # emitted since: stale
    assert continuation([1, 2, 3, 4, 5, 6, 7], task, Proposal.chain([7])) is None  # the guess alone
    assert continuation([1, 2, 3, 4, 5, 6, 7], task, Proposal([7, 8, 9], [-1, -1, 0])) is None  # a tree
    q = SparseQ.stack([(torch.tensor([t, 0]), torch.tensor([0.75, 0.25])) for t in (7, 8, 9, 10)], 16)
    kept = continuation([1, 2, 3, 4, 5, 6, 7], task, Proposal.chain([7, 8, 9, 10], q))
    assert kept.is_chain and kept.q.ids[:, 0].tolist() == [8, 9, 10]  # q travels with its nodes


def test_continue_mode_drafts_on_from_held_proposals():
    sched = Scheduler(SchedulerConfig(k=3, k_max=8, adaptive=False, max_model_len=256), None, pipelining="continue")
    seqs = _decoding(sched, [_seq(i) for i in range(3)] + [_seq(3, max_tokens=4, output=0)])
    for s in seqs:
        s.draft_synced = 8
    for s in seqs[1:]:
        s.proposal = Proposal.chain([1, 2, 3])
    plan = sched.schedule()
    # Everyone is verified: r0 without a proposal (one token), beside everyone's drafting
    assert plan.pipelined and {v.seq_id for v in plan.verify} == {"r0", "r1", "r2", "r3"}
    assert not any(t.now for t in plan.draft)  # the verify waits for no draft
    tasks = {t.seq_id: t for t in plan.draft}
    for seq_id in ("r1", "r2"):  # node 0 guesses the token after the proposal, then K more
        t = tasks[seq_id]
        assert t.continues and t.budget == 4 and t.start == 8 and t.new_tokens == [8, 9, 1, 2, 3]
    # no proposal: it drafts on from its own tokens, node 0 guessing the token this verify emits
    assert tasks["r0"].continues and tasks["r0"].budget == 4 and tasks["r0"].new_tokens == [8, 9]
    assert "r3" not in tasks  # 4 tokens at most: the proposal and its bonus use them all
    one = Scheduler(SchedulerConfig(k=3, k_max=8, adaptive=False, max_model_len=256), None, pipelining="continue")
    lone = _decoding(one, [_seq(0)])
    plan = one.schedule()  # a single request continues too: it has no other group to wait for
    # Holding no proposal, its pass would carry nothing: it drafts now, and drafts on from that draft
    # (the executor appends that draft's tokens; K + 1 nodes after at most K drafted, within 20 tokens).
    now, after = plan.draft
    assert plan.pipelined and now.now and not now.continues and plan.verify[0].seq_id == "r0"
    assert after.continues and after.after_draft and not after.now and after.new_tokens == now.new_tokens
    assert after.budget == 4
    lone[0].proposal = Proposal.chain([1, 2, 3])  # holding one, it only drafts on from it
    plan = one.schedule()
    assert [(t.continues, t.after_draft) for t in plan.draft] == [(True, False)]
    lone[0].proposal = None
    sched.pipelining = "split"
    assert not any(t.continues for t in sched.schedule().draft)
    one.pipelining = "split"
    assert not one.schedule().pipelined and lone[0].proposal is None  # one request: nothing to split


def test_a_continuation_of_a_draft_made_now_takes_its_tokens_or_is_dropped():
    def task(seq_id, after):
        return DraftTask(seq_id, "draft-0", 8, [8, 9], 4, SamplingParams(), 0, 2, now=False, continues=True,
                         after_draft=after)

    result = StepResult(proposals={"a": Proposal.chain([1, 2, 3]), "t": Proposal([1, 2], [-1, -1]),
                                   "e": Proposal.chain([])})
    plain = task("p", False)
    out = after_drafts([task("a", True), plain, task("t", True), task("e", True), task("gone", True)], result)
    # a: the draft's tokens appended (node 0 of the continuation then guesses the token after 3); a plain
    # continuation is kept as it is; a tree, an empty draft or none (failed): nothing to continue from
    got = [(t.seq_id, t.new_tokens, t.after_draft) for t in out]
    assert got == [("a", [8, 9, 1, 2, 3], False), ("p", [8, 9], False)]
    assert out[1] is plain


def test_a_draft_still_in_flight_is_verified_when_it_lands_never_drafted_again():
    """A draft made beside last step's verify may still be running when this step is scheduled. Its request
    is verified this step with that draft (the executor waits for it), and is not drafted a second time:
    before this, the same half kept being verified and the other half re-drafted, step after step."""
    sched = Scheduler(SchedulerConfig(k=3, k_max=8, adaptive=False, max_model_len=256), None, pipelining="split")
    seqs = _decoding(sched, [_seq(i) for i in range(4)])
    first = sched.schedule()
    now = {t.seq_id for t in first.draft if t.now}
    later = {t.seq_id for t in first.draft if not t.now}
    assert {v.seq_id for v in first.verify} == now and len(later) == 2
    plan = sched.schedule(in_flight=frozenset(later))  # the later drafts have not landed yet
    assert {v.seq_id for v in plan.verify} == later
    assert all(v.proposal is None for v in plan.verify)  # the one in flight
    assert {t.seq_id for t in plan.draft} == now and not any(t.now for t in plan.draft)
    sched.pipelining = "continue"  # verified with it too, and no continuation from a draft not yet seen
    plan = sched.schedule(in_flight=frozenset(later))
    assert {v.seq_id for v in plan.verify} == {s.request_id for s in seqs}
    assert {t.seq_id for t in plan.draft} == now and all(t.continues for t in plan.draft)
    sched.pipelining = "off"
    flat = sched.schedule(in_flight=frozenset(later))
    assert {v.seq_id for v in flat.verify} == {s.request_id for s in seqs}
    assert {t.seq_id for t in flat.draft} == now  # drafted now; the others' drafts are on their way


def test_auto_continues_when_acceptance_is_high_and_drafting_is_memory_bound():
    # Memory-bound (a GPU): a pass costs the same for a few tokens as for one; so does a draft step, and a
    # draft of K = 4 costs about one verify pass.
    model = CostModel(CostCurve(0.02, 0.0, 0.0001), DraftCost(0.0, 0.005, 0.0), sequential_draft=True)
    sched = Scheduler(SchedulerConfig(k=4, k_max=8, adaptive=False, max_model_len=256), model, pipelining="auto")
    seqs = _decoding(sched, [_seq(i) for i in range(4)])
    sched.acceptance_prior = 0.95
    rates = sched._pipeline_rates(seqs, {s.request_id: 4 for s in seqs})
    assert max(rates, key=rates.get) == "continue"
    assert rates["split"] < 1.01 * rates["flat"]  # half a batch drafts no faster: splitting alone gains nothing
    sched.acceptance_prior = 0.3  # continuations seldom hold: a step emits little more than one token a
    rates = sched._pipeline_rates(seqs, {s.request_id: 4 for s in seqs})  # request, and waits on the draft
    plain = sched._pipeline_rates(seqs, {s.request_id: 0 for s in seqs})["flat"]
    assert rates["continue"] < plain and rates["continue"] > rates["flat"]  # no draft: better; flat: worse


def test_a_model_drafters_cost_grows_with_its_steps_before_and_after_timing():
    model, lookup = CostModel(CostCurve(0.02, 0.0, 0.0), sequential_draft=True), CostModel(CostCurve(0.02, 0.0, 0.0))
    assert 1.4 < model.draft_seconds([6]) / model.draft_seconds([4]) < 1.6  # a forward a step
    assert lookup.draft_seconds([6]) / lookup.draft_seconds([4]) < 1.2  # one call, a little per node
    for _ in range(10):
        model.draft.observe(5, 20, 0.65)  # measured: 130 ms a step at 4 rows
    assert model.draft_seconds([5] * 4) == pytest.approx(0.65, rel=0.01)
    assert 1.4 < model.draft_seconds([6]) / model.draft_seconds([4]) < 1.6  # rescaled, same shape


def test_a_draft_call_that_read_a_prompt_teaches_the_read_rate_not_a_drafts_cost():
    synced = [DraftTask("a", "draft-0", 12, [5, 6], 4, SamplingParams(), 0, 10, now=True),
              DraftTask("b", "draft-0", 12, [7], 2, SamplingParams(), 0, 10, now=True)]
    assert draft_call(synced, 0.5) == [(4, 6, 0, 0.5)]  # steps: the longest; nodes: all; no prompt read
    first = DraftTask("c", "draft-0", 0, list(range(11)), 4, SamplingParams(), 0, 10, now=True)
    assert draft_call(synced + [first], 2.0) == [(4, 10, 11, 2.0)] and draft_call([], 0.0) == []
    model = CostModel(CostCurve(0.02, 0.0, 0.0), sequential_draft=True)
    model.observe_draft_read(100, 0.5)
    assert model.draft_read_rate == pytest.approx(0.005)


def test_drafters_start_reading_prompts_only_where_the_read_pays_back():
    # Verify 0.1 s a pass, nearly flat; a draft 30 ms a step: at acceptance 0.8 a token costs 16 ms drafted
    # against 25 ms plain, 9 ms saved. Four drafters that have not read their 10-token prompts (40 tokens).
    model = CostModel(CostCurve(0.1, 0.0, 1e-5), DraftCost(0.0, 0.03, 0.0), sequential_draft=True)
    sched = Scheduler(SchedulerConfig(k=4, k_max=4, adaptive=True, max_model_len=256), model)
    sched.acceptance_prior = 0.8
    _decoding(sched, [_seq(i, max_tokens=40) for i in range(4)])
    assert sched.schedule().draft  # unmeasured, reading is free
    model.draft_read_rate = 0.001  # 40 ms of reads
    assert {t.start for t in sched.schedule().draft} == {0}  # 160 tokens to come save ~1.4 s: read
    _decoding(sched, [_seq(i, max_tokens=3) for i in range(4)])  # 12 to come save ~0.1 s, still > 40 ms
    assert sched.schedule().draft
    model.draft_read_rate = 0.05  # 2 s of reads
    plan = sched.schedule()
    assert not plan.draft and all(v.proposal is None for v in plan.verify)
    long = _decoding(sched, [_seq(i, max_tokens=100) for i in range(4)])  # 400 to come save ~3.4 s
    assert sched.schedule().draft
    long[0].draft_synced = 10  # read already: it may draft while the others stay plain
    seqs = _decoding(sched, [long[0]] + [_seq(i, max_tokens=3) for i in range(1, 4)])
    caps = [sched.cap(s) for s in seqs]
    assert sched._unread(seqs, caps, [0.8] * 4, [10] * 4) == [caps[0], 0, 0, 0]


def test_continue_drafts_to_the_targets_pace_not_to_the_flat_choice():
    # Memory-bound verify (0.02 s a pass, a little more per token) and a sequential drafter at 6 ms a step:
    # a flat step pays draft + verify, a continue step only the larger of the two, so continue's best K
    # is the longest draft (K + 1 steps with the guess) that still hides behind the pass.
    model = CostModel(CostCurve(0.02, 0.0, 0.0001), DraftCost(0.0, 0.006, 0.0), sequential_draft=True)
    sched = Scheduler(SchedulerConfig(k=4, k_max=8, adaptive=True, max_model_len=256), model, pipelining="continue")
    seqs = _decoding(sched, [_seq(i) for i in range(4)])
    sched.acceptance_prior = 0.9
    flat = model.choose([0.9] * 4, [8] * 4).ks
    plan = sched.schedule()
    drafted = {t.budget - 1 for t in plan.draft}  # a continuation drafts budget + 1 nodes (node 0: the guess)
    assert plan.pipelined and len(plan.draft) == 4 and len(drafted) == 1
    k = drafted.pop()

    def rate(j):
        return sched._continue_rate(seqs, {s.request_id: j for s in seqs})

    assert k < flat[0] and rate(k) == max(rate(j) for j in range(1, 9)) and rate(k) > 1.05 * rate(flat[0])
    assert sched._pipeline_rates(seqs, {s.request_id: f for s, f in zip(seqs, flat)})["continue"] == rate(k)
    sched.config.adaptive = False  # a fixed K is kept as asked, continue or not
    plan = sched.schedule()  # (and asked of every pass: holding none, each drafts K now, then K + 1 on from it)
    assert {(t.now, t.budget) for t in plan.draft} == {(True, 4), (False, 5)}


def test_continue_pays_where_flat_drafting_does_not():
    # A drafter whose call costs as much as a verify pass, at acceptance 0.5: flat, a step emits under two
    # tokens a row for two passes' time, so the cost model drafts nothing; behind the pass the draft is free.
    model = CostModel(CostCurve(0.02, 0.0, 0.0001), DraftCost(0.019, 0.0, 1e-5))
    assert model.choose([0.5] * 4, [8] * 4, 0.03).ks == [0] * 4
    sched = Scheduler(SchedulerConfig(k=4, k_max=8, adaptive=True, max_model_len=256), model, pipelining="auto")
    seqs = _decoding(sched, [_seq(i) for i in range(4)])
    sched.acceptance_prior = 0.5
    plan = sched.schedule()
    assert plan.pipelined and len(plan.draft) == 4 and all(t.continues and not t.now for t in plan.draft)
    assert {v.seq_id for v in plan.verify} == {s.request_id for s in seqs}
    sched.pipelining = "split"  # a split has no drafts to overlap when none pays flat
    assert not sched.schedule().pipelined and not sched.schedule().draft


def test_a_new_requests_drafter_reads_its_prompt_beside_the_targets_prefill():
    sched = Scheduler(SchedulerConfig(k=3, k_max=8, adaptive=False, max_model_len=256), None, pipelining="auto")
    sched.targets, sched.drafters = {"target-0": 8}, {"draft-0": 8}
    sched.waiting = deque([_seq(0)])
    plan = sched.schedule()
    (task,) = plan.draft
    assert [a.seq_id for a in plan.admit] == ["r0"] and not plan.verify
    assert task.continues and not task.now and task.start == 0 and task.new_tokens == list(range(10))
    assert task.budget == 4  # the prior K, and node 0 guesses the target's first token
    guess = Proposal.chain([7, 1, 2, 3])
    assert continuation(list(range(10)) + [7], task, guess).tokens == [1, 2, 3]  # the prefill emitted 7
    assert continuation(list(range(10)) + [8], task, guess) is None
    off = Scheduler(SchedulerConfig(k=3, k_max=8, adaptive=False, max_model_len=256), None, pipelining="off")
    off.targets, off.drafters = {"target-0": 8}, {"draft-0": 8}
    off.waiting = deque([_seq(0)])
    assert not off.schedule().draft  # drafts never run beside the target there (one device, or asked so)


def test_a_marginal_gain_is_not_taken():
    model = CostModel(CostCurve(0.05, 0.0, 0.004), DraftCost(0.0, 0.0, 0.0))
    assert model.choose([0.3], [8]).ks != [0]  # a small predicted gain
    assert model.choose([0.3], [8], min_gain=0.25).ks == [0]  # 21% predicted: below the margin, plain decoding


def test_budgets_follow_the_measured_acceptance_of_the_whole_step():
    """When passes deliver fewer accepted drafts than the per-request estimates promised, the cost model
    scales its expectation down and stops drafting where the margin was thin."""
    model = CostModel(CostCurve(0.05, 0.0, 0.004), DraftCost(0.0, 0.0, 0.0))
    alphas, caps = [0.5] * 8, [8] * 8
    assert sum(model.choose(alphas, caps, min_gain=0.03).ks) > 0  # predicted to pay
    for _ in range(40):
        model.observe_tokens(predicted_accepted=8.0, accepted=2)  # a quarter of the promise arrives
    assert model.token_scale == pytest.approx(0.25, abs=0.01)
    assert model.choose(alphas, caps, min_gain=0.03).ks == [0] * 8
    for _ in range(200):
        model.observe_tokens(predicted_accepted=8.0, accepted=8)  # and back: recent steps weigh most
    assert model.token_scale == pytest.approx(1.0, abs=0.01)
    assert sum(model.choose(alphas, caps, min_gain=0.03).ks) > 0


def test_the_scheduler_probes_after_a_run_of_plain_steps():
    """When the cost model has chosen plain decoding for probe_every steps, one request drafts anyway:
    new evidence about the drafter's cost and acceptance, which plain steps never bring."""
    pricey = CostModel(CostCurve(0.002, 0.0, 0.004), DraftCost(0.05, 0.0, 0.0))  # drafting never pays
    sched = Scheduler(SchedulerConfig(k=3, k_max=8, adaptive=True, max_model_len=256, probe_every=4), pricey)
    sched.targets, sched.drafters = {"target-0": 8}, {"draft-0": 8}
    seqs = [_seq(i) for i in range(3)]
    for s in seqs:
        s.ready, s.target, s.drafter = True, "target-0", "draft-0"
    seqs[1].acceptance.observe(drafted=4, accepted=4)  # the likeliest to be accepted
    sched.running = seqs
    drafted = [[(t.seq_id, t.budget) for t in sched.schedule().draft] for _ in range(8)]
    assert drafted == [[], [], [], [("r1", 3)], [], [], [], [("r1", 3)]]
