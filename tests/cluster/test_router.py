"""The router on a real local Ray cluster: exactness, pipelining, faults, cancellation, metrics."""

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


def _all_released(router) -> bool:
    loads = router.worker_loads()
    return all(load["sequences"] == 0 and load["cache_occupied"] == 0 for load in loads["target"]) and all(
        load["sequences"] == 0 for load in loads["draft"]
    )


def test_sixteen_concurrent_greedy_equal_target_only(router, reference):
    outputs = router.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outputs] == reference
    assert sum(o.stats.drafted for o in outputs) > 0
    assert all(p == 0 for p in router.targets.pinned)
    assert _all_released(router)
    # both replicas and both draft workers were used
    assert router.metrics.text().count("specdec_requests_total") >= 1


def test_pipelining_overlaps_drafting_with_verification(router, reference):
    router.generate(PROMPTS, PARAMS)  # warm
    steps_before = router.steps
    outputs = router.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outputs] == reference
    total_verifies = sum(o.stats.steps for o in outputs)
    # With two phases, each step verifies about half the requests while the other half drafts.
    per_step = total_verifies / (router.steps - steps_before)
    assert per_step < 0.75 * len(PROMPTS)


def _generate_with_fault(router, fault, after_steps=3):
    """Generate PROMPTS, calling fault() once after a few steps, mid-load."""
    seqs = [router.build(p, s) for p, s in zip(PROMPTS, PARAMS)]
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
    restarts = router.drafts.restarts
    outputs = _generate_with_fault(router, lambda: ray.kill(router.drafts.handles[0]))
    assert [o.token_ids for o in outputs] == reference
    assert all(o.finish_reason in ("length", "eos") for o in outputs)  # none failed or cancelled
    assert router.drafts.restarts == restarts + 1
    assert _all_released(router)


def test_killing_a_target_replica_loses_nothing(router, reference):
    restarts = router.targets.restarts
    outputs = _generate_with_fault(router, lambda: ray.kill(router.targets.handles[1]))
    assert [o.token_ids for o in outputs] == reference
    assert router.targets.restarts == restarts + 1
    router.wait_ready()
    assert _all_released(router)


def test_cancel_frees_caches_everywhere(router):
    ids = [router.add_request(p, SamplingParams(max_tokens=40)) for p in PROMPTS]
    for _ in range(2):
        router.step()
    for request_id in ids[::2]:
        assert router.abort(request_id)
    while router.has_unfinished():
        router.step()
    assert _all_released(router)


def test_unpipelined_router_reproduces_in_process_sampling(ray_local, tiny_models, make_engine):
    """Pipelining off: every request is drafted then verified each step, as in the in-process engine, so
    the same seeds give the same sampled tokens through actors as in one process."""
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=s) for s in range(8)]
    local = make_engine("model", k=3, draft="draft_noisy").generate(PROMPTS[:8], params)
    router = Router(cluster_config(tiny_models, replicas=1, pipelining=False))
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


def test_metrics_are_scrapeable(router):
    text = router.metrics.text()
    for name in ("specdec_requests_total", "specdec_acceptance_rate", "specdec_mean_accepted_length",
                 "specdec_step_seconds_bucket", "specdec_time_to_first_token_seconds_bucket",
                 "specdec_time_per_output_token_seconds_bucket", "specdec_queue_depth",
                 "specdec_target_busy_fraction", "specdec_worker_failures_total"):
        assert name in text, name
    assert 0.0 < router.target_utilization() <= 1.0


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

    ray.get([h.__ray_call__.remote(inject) for h in router.targets.handles])
    try:
        params = PARAMS[:8] + [SamplingParams(max_tokens=20, temperature=1.0, seed=666)]
        outputs = router.generate(PROMPTS[:8] + [PROMPTS[0]], params)
    finally:
        ray.get([h.__ray_call__.remote(lambda w: w.__dict__.pop("_accept", None)) for h in router.targets.handles])
    assert [o.token_ids for o in outputs[:8]] == reference[:8]
    assert outputs[8].finish_reason == "error"
    assert all(p == 0 for p in router.targets.pinned) and all(p == 0 for p in router.drafts.pinned)
    assert _all_released(router)
    assert router.metrics.value("specdec_request_errors_total") >= 1
