"""The router on a real local Ray cluster: exactness, pipelining, faults, cancellation, metrics."""

import time

import pytest
import ray

from cluster.requests import collect
from cluster.router import Router
from cluster.types import SamplingParams
from tests.cluster.conftest import cluster_config

PROMPTS = [
    "def add(a, b):\n    return",
    "import os\n",
    "class Parser:\n    def __init__(self, text):\n        self.text = text\n",
    "x",
    "for i in range(10):\n    print(i)\n",
    "    \"\"\"Return the",
    "if __name__ == '__main__':\n    main()\n",
    "from dataclasses import dataclass\n\n@dataclass\nclass Point:\n    x: int = 0\n",
] * 2  # 16 concurrent requests, mixed lengths
PARAMS = [SamplingParams(max_tokens=12 + 2 * (i % 5)) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def reference(make_engine):
    """Target-only greedy outputs from the in-process engine."""
    engine = make_engine("ngram", k=0)
    return [o.token_ids for o in engine.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def router(ray_local, tiny_models):
    router = Router(cluster_config(tiny_models, max_batch_size=8))
    router.wait_ready()
    yield router
    router.shutdown()


def _first(pool):
    return next(iter(pool.handles.values()))


def _all_released(router) -> bool:
    loads = router.worker_loads()
    return all(load["sequences"] == 0 and load["cache_occupied"] == 0 for load in loads["target"]) and all(
        load["sequences"] == 0 for load in loads["draft"]
    )


def _passes(router) -> dict[str, list[int]]:
    return {pool: [len(log) for log in ray.get([h.call_log.remote() for h in p.handles.values()])]
            for pool, p in (("target", router.targets), ("draft", router.drafts))}


def test_sixteen_concurrent_greedy_equal_target_only(router, reference):
    before = _passes(router)
    outputs = router.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outputs] == reference
    assert sum(o.stats.drafted for o in outputs) > 0
    assert not router.running and not router.waiting
    assert _all_released(router)
    after = _passes(router)  # 16 requests over 8 slots each: both replicas and both draft workers worked
    for pool in ("target", "draft"):
        assert all(a > b for a, b in zip(after[pool], before[pool])), (pool, before, after)


def _overlaps(router, since: float) -> int:
    """Draft calls that ran while a verify pass was running (wall-clock intervals, after `since`)."""
    verifies = [c for log in ray.get([h.call_log.remote() for h in router.targets.handles.values()]) for c in log if c[0] >= since]
    drafts = [c for log in ray.get([h.call_log.remote() for h in router.drafts.handles.values()]) for c in log if c[0] >= since]
    return sum(any(d0 < v1 and v0 < d1 for v0, v1 in verifies) for d0, d1 in drafts)


def test_pipelining_overlaps_drafting_with_verification(router, ray_local, tiny_models, reference):
    """Pipelined: draft calls for one group run while the target verifies the other. The same workload
    with pipelining off never overlaps them."""
    router.generate(PROMPTS, PARAMS)  # warm the timing estimates
    since, steps = time.time(), router.pipelined_steps
    assert [o.token_ids for o in router.generate(PROMPTS, PARAMS)] == reference
    assert router.pipelined_steps > steps
    assert _overlaps(router, since) >= 5
    # continued drafts (made on from proposals being verified) became proposals, and some were dropped
    assert router.metrics.value("specdec_continued_drafts_total", outcome="used") > 0
    assert router.metrics.value("specdec_continued_drafts_total", outcome="dropped") > 0
    flat = Router(cluster_config(tiny_models, max_batch_size=8, pipelining="off"))
    try:
        flat.wait_ready()
        since = time.time()
        assert [o.token_ids for o in flat.generate(PROMPTS, PARAMS)] == reference
        assert flat.pipelined_steps == 0 and _overlaps(flat, since) == 0
    finally:
        flat.shutdown()


def _generate_with_fault(router, fault, after_steps=3, prompts=PROMPTS, params=PARAMS):
    """Generate, calling fault() once after a few steps, mid-load."""
    seqs = [router.build(p, s) for p, s in zip(prompts, params)]
    streams = {seq.request_id: router.text_stream(seq) for seq in seqs}
    for seq in seqs:
        router.enqueue(seq)
    steps, step = 0, router.step

    def faulty_step():
        nonlocal steps
        steps += 1
        if steps == after_steps + 1:
            fault()
        return step()

    router.step = faulty_step
    try:
        return collect(router, streams)
    finally:
        del router.step


def test_killing_a_draft_worker_loses_nothing(router, reference):
    restarts, failovers = router.drafts.restarts, router.metrics.value("specdec_worker_failures_total", pool="draft")
    outputs = _generate_with_fault(router, lambda: ray.kill(_first(router.drafts)))
    assert [o.token_ids for o in outputs] == reference
    assert all(o.finish_reason in ("length", "eos") for o in outputs)  # none failed or cancelled
    assert router.drafts.restarts == restarts + 1
    assert router.metrics.value("specdec_worker_failures_total", pool="draft") == failovers + 1
    assert _all_released(router)


def test_killing_a_target_replica_loses_nothing(router, reference):
    restarts, failovers = router.targets.restarts, router.metrics.value("specdec_worker_failures_total", pool="target")
    outputs = _generate_with_fault(router, lambda: ray.kill(list(router.targets.handles.values())[1]))
    assert [o.token_ids for o in outputs] == reference
    assert router.targets.restarts == restarts + 1
    assert router.metrics.value("specdec_worker_failures_total", pool="target") == failovers + 1
    router.wait_ready()
    assert _all_released(router)


def test_a_target_dying_during_prefill_requeues_its_requests(router, reference):
    """The kill lands while a batch is being admitted: those requests are queued again, nothing is lost."""
    def kill_then_admit():
        ray.kill(_first(router.targets))

    outputs = _generate_with_fault(router, kill_then_admit, after_steps=0)
    assert [o.token_ids for o in outputs] == reference
    router.wait_ready()
    assert not router.running and _all_released(router)


def test_failover_at_temperature_keeps_seeded_tokens(router, make_engine):
    """Keyed randomness: seeded sampled requests give the target-only tokens even though their replica
    is killed mid-generation and they are re-prefilled elsewhere."""
    params = [SamplingParams(max_tokens=20, temperature=1.0, seed=s) for s in range(len(PROMPTS))]
    expected = make_engine("ngram", k=0).generate(PROMPTS, params)
    outputs = _generate_with_fault(router, lambda: ray.kill(_first(router.targets)), params=params)
    assert [o.token_ids for o in outputs] == [e.token_ids for e in expected]
    router.wait_ready()
    assert _all_released(router)


def test_abort_stops_a_request_at_once(router):
    """Aborted requests (some with a draft in flight) emit nothing more, are counted as cancelled, and
    their state is freed on every actor; the others finish."""
    cancelled = router.metrics.value("specdec_requests_total", finish_reason="cancelled")
    ids = [router.add_request(p, SamplingParams(max_tokens=40)) for p in PROMPTS]
    for _ in range(3):
        router.step()
    aborted = set(ids[::2])
    for request_id in aborted:
        assert router.abort(request_id) is not None
    late, finished = [], set()
    while router.has_unfinished():
        for d in router.step():
            late += [d.request_id] if d.request_id in aborted else []
            finished |= {d.request_id} if d.finish_reason else set()
    assert not late
    assert finished == set(ids) - aborted
    assert router.metrics.value("specdec_requests_total", finish_reason="cancelled") == cancelled + len(aborted)
    assert _all_released(router)


def test_unpipelined_router_reproduces_in_process_sampling(ray_local, tiny_models, make_engine):
    """Pipelining off: every request is drafted then verified each step, as in the in-process engine, so
    the same seeds give the same sampled tokens through actors as in one process."""
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=s) for s in range(8)]
    local = make_engine("model", k=3, draft="draft_noisy").generate(PROMPTS[:8], params)
    router = Router(cluster_config(tiny_models, replicas=1, pipelining="off"))
    try:
        router.wait_ready()  # until the draft worker answers, requests verify without drafts (exact, other RNG path)
        remote = router.generate(PROMPTS[:8], params)
        assert sum(o.stats.drafted for o in remote) > 0
        assert [o.token_ids for o in remote] == [o.token_ids for o in local]
        other = router.generate(PROMPTS[:8], [SamplingParams(max_tokens=10, temperature=0.8, seed=s + 100)
                                              for s in range(8)])
        assert [o.token_ids for o in other] != [o.token_ids for o in local]
    finally:
        router.shutdown()


def test_metrics_report_a_known_workload(ray_local, tiny_models):
    """On a fresh router: requests by finish reason, tokens, acceptance = accepted / drafted, TTFT and
    TPOT counts, target utilisation, failovers after a kill, and the metrics_port endpoint."""
    import urllib.request

    from tests.api.conftest import free_port

    port = free_port()
    config = cluster_config(tiny_models, replicas=1, max_batch_size=8)
    config.cluster.metrics_port = port
    router = Router(config)
    try:
        router.wait_ready()
        outputs = router.generate(PROMPTS[:6], [SamplingParams(max_tokens=10)] * 6)
        m = router.metrics
        assert m.value("specdec_requests_total", finish_reason="length") == sum(o.finish_reason == "length" for o in outputs)
        assert m.value("specdec_requests_total", finish_reason="eos") == sum(o.finish_reason == "eos" for o in outputs)
        assert m.value("specdec_generated_tokens_total") == sum(len(o.token_ids) for o in outputs)
        drafted, accepted = (m.value(f"specdec_{n}_tokens_total", drafter="model") for n in ("draft", "accepted"))
        assert drafted == sum(o.stats.drafted for o in outputs) > 0
        assert accepted == sum(o.stats.accepted for o in outputs)
        assert m.value("specdec_acceptance_rate", drafter="model") == pytest.approx(accepted / drafted)
        assert m.value("specdec_time_to_first_token_seconds_count") == 6
        assert m.value("specdec_time_per_output_token_seconds_count") == 6
        assert 0.0 < router.target_utilization() <= 1.0
        assert m.value("specdec_target_busy_fraction") == pytest.approx(router.target_utilization(), abs=0.05)
        _generate_with_fault(router, lambda: ray.kill(_first(router.drafts)), prompts=PROMPTS[:4],
                             params=PARAMS[:4])
        assert m.value("specdec_worker_failures_total", pool="draft") == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
            text = response.read().decode()
        assert 'specdec_worker_failures_total{pool="draft"} 1.0' in text
    finally:
        router.shutdown()


def test_draft_options_through_the_router_stay_exact(ray_local, tiny_models, reference):
    """Cost-model budgets (adaptive), a confidence cutoff, and a draft timeout that drops late drafts:
    each changes only speed."""
    config = cluster_config(tiny_models, replicas=1, k=4, adaptive=True, max_batch_size=16)
    config.drafter.confidence_threshold = 0.3
    router = Router(config)
    try:
        router.wait_ready()
        outputs = router.generate(PROMPTS, PARAMS)
        assert [o.token_ids for o in outputs] == reference
        assert sum(o.stats.drafted for o in outputs) > 0
        router.executor.draft_timeout_s = 1e-4  # every draft is late: dropped, decoding goes on exactly
        assert [o.token_ids for o in router.generate(PROMPTS, PARAMS)] == reference
        assert _all_released(router)
    finally:
        router.shutdown()


def test_target_only_router(ray_local, tiny_models, reference):
    router = Router(cluster_config(tiny_models, k=0, replicas=1, max_batch_size=16))
    try:
        assert router.drafts is None
        assert [o.token_ids for o in router.generate(PROMPTS, PARAMS)] == reference
    finally:
        router.shutdown()


def test_a_request_failing_in_a_target_actor_fails_alone(router, reference):
    """Fault injected into the real actors: the faulty request ends with finish_reason 'error', the
    others are exact, and every slot, sequence and pin is freed."""

    def inject(worker):
        accept = type(worker)._accept

        def faulty(self, logits, seqs, items):
            if any(s.params.seed == 666 for s in seqs):
                raise RuntimeError("injected fault")
            return accept(self, logits, seqs, items)

        worker._accept = faulty.__get__(worker)

    ray.get([h.__ray_call__.remote(inject) for h in router.targets.handles.values()])
    try:
        params = PARAMS[:8] + [SamplingParams(max_tokens=20, temperature=1.0, seed=666)]
        outputs = router.generate(PROMPTS[:8] + [PROMPTS[0]], params)
    finally:
        ray.get([h.__ray_call__.remote(lambda w: w.__dict__.pop("_accept", None)) for h in router.targets.handles.values()])
    assert [o.token_ids for o in outputs[:8]] == reference[:8]
    assert outputs[8].finish_reason == "error"
    assert not router.running and not router.waiting
    assert _all_released(router)
    assert router.metrics.value("specdec_request_errors_total") >= 1


@pytest.mark.slow
def test_a_dead_draft_workers_requests_draft_on_another_worker_at_the_next_step(ray_local, tiny_models, make_engine):
    """The step that finds a draft worker dead moves its requests; the very next plan drafts every one of
    them on a live worker (not the dead one, nor its replacement still loading). Long requests, so none
    is too close to its end to draft."""
    params = [SamplingParams(max_tokens=48, min_tokens=48) for _ in PROMPTS]
    reference = [o.token_ids for o in make_engine("ngram", k=0).generate(PROMPTS, params)]
    router = Router(cluster_config(tiny_models, max_batch_size=8, pipelining="off"))
    try:
        router.wait_ready()
        plans, results = [], []
        schedule, execute = router.scheduler.schedule, router.executor.execute
        router.scheduler.schedule = lambda *a, **kw: plans.append(schedule(*a, **kw)) or plans[-1]
        router.executor.execute = lambda plan: results.append(execute(plan)) or results[-1]
        victim = next(iter(router.drafts.handles))
        outputs = _generate_with_fault(router, lambda: ray.kill(router.drafts.handles[victim]), params=params)
        assert [o.token_ids for o in outputs] == reference and all(o.finish_reason == "length" for o in outputs)
        died = next(i for i, r in enumerate(results) if victim in r.dead_workers)
        moved = {t.seq_id for t in plans[died].draft if t.drafter == victim}
        after = {t.seq_id: t.drafter for t in plans[died + 1].draft}
        verified_next = {t.seq_id for t in plans[died + 1].verify}
        assert moved and moved & verified_next
        stuck = {s: after.get(s) for s in moved & verified_next if after.get(s) in (None, victim)}
        assert not stuck, (stuck, victim, [r.dead_workers for r in results[died: died + 2]])
        assert _all_released(router)
    finally:
        router.shutdown()
