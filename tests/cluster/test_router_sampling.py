"""Sampling keeps the target's distribution at every output position through the Ray router, with
pipelining forced to `continue`: drafts of one group are made while the other group is verified, and
drafts made on from proposals under verification become the next proposals, by real actors. Same test as tests/engine/test_sampling_positions.py (5000 seeds, exact p per position)."""

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from cluster.router import Router
from tests.cluster.conftest import cluster_config
from tests.engine.test_sampling_positions import ALPHA, SETTINGS, check_positions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_target(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["target"], local_files_only=True).eval()


# Every setting runs through the engine (tests/engine), which runs the same loop and the same sampling
# functions; through the router, one setting per drafter kind (real q, one-hot q) keeps the suite's time
# bounded: what the router adds is actors and pipelining, not settings.
CASES = [("model", "t1"), ("ngram", "top_k5")]


@pytest.fixture(scope="module")
def routers(ray_local, tiny_models):
    """routers(kind) -> a pipelined router with 2 target and 2 draft actors (one kind alive at a time)."""
    made: dict = {}

    def get(kind: str) -> Router:
        if kind not in made:
            for old in made.values():
                old.shutdown()
            made.clear()
            made[kind] = Router(cluster_config(tiny_models, kind=kind, k=3, replicas=2, max_batch_size=32,
                                               max_waiting=6000))
            made[kind].wait_ready()
        return made[kind]

    yield get
    for router in made.values():
        router.shutdown()


@pytest.mark.parametrize("kind, setting", CASES)
def test_every_position_follows_the_target_through_the_router(routers, hf_target, kind, setting):
    router = routers(kind)
    steps = router.pipelined_steps
    pvalues = check_positions(router, router.tokenizer, hf_target, SETTINGS[setting])
    assert (pvalues > ALPHA).all(), f"positions failing: {np.flatnonzero(pvalues <= ALPHA).tolist()} {pvalues}"
    assert router.pipelined_steps > steps  # the pipelined path produced these samples
    if kind == "model":  # and continued drafts (prompt lookup's all-accepted chains are rare at top-k 5)
        assert router.metrics.value("specdec_continued_drafts_total", outcome="used") > 0
    drafter = router.config.drafter.kind
    assert router.metrics.value("specdec_accepted_tokens_total", drafter=drafter) > 0
