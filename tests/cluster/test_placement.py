"""Placement on a real multi-node Ray cluster (ray.cluster_utils): separate draft and target nodes."""

import time

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.router import Router
from cluster.types import SamplingParams
from tests.cluster.conftest import cluster_config


@pytest.fixture(scope="module")
def two_tier_cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # the head runs no model work
    draft_node = cluster.add_node(num_cpus=1, resources={"draft_node": 4})
    target_node = cluster.add_node(num_cpus=1, resources={"target_node": 4})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield {"head": cluster.head_node.node_id, "draft": draft_node.node_id, "target": target_node.node_id}
    ray.shutdown()
    cluster.shutdown()


def test_drafts_and_targets_land_on_their_own_nodes(two_tier_cluster, tiny_models, make_engine):
    router = Router(cluster_config(tiny_models, replicas=2))
    try:
        router.wait_ready()
        target_nodes = set(ray.get([h.node_id.remote() for h in router.targets.handles.values()]))
        draft_nodes = set(ray.get([h.node_id.remote() for h in router.drafts.handles.values()]))
        assert target_nodes == {two_tier_cluster["target"]}
        assert draft_nodes == {two_tier_cluster["draft"]}
        prompts = ["def add(a, b):\n    return", "import os\n", "x", "class A:\n"]
        params = SamplingParams(max_tokens=10)
        expected = [o.token_ids for o in make_engine("ngram", k=0).generate(prompts, params)]
        assert [o.token_ids for o in router.generate(prompts, params)] == expected
    finally:
        router.shutdown()


def test_actor_without_matching_node_stays_pending(two_tier_cluster, tiny_models):
    """A pool asking for a resource no node has is never placed, while the same actor asking for a
    resource the target node has answers within the same wait (the positive control)."""
    from cluster.workers.actors import start_target_actor

    config = cluster_config(tiny_models, replicas=1)
    start = time.time()
    placeable = start_target_actor(config.cluster.target_pool, config.target, 2, 64)
    config.cluster.target_pool.resources = {"h100_node": 1}
    unplaceable = start_target_actor(config.cluster.target_pool, config.target, 2, 64)
    try:
        ready, _ = ray.wait([placeable.node_id.remote()], timeout=120)
        assert ready and ray.get(ready[0]) == two_tier_cluster["target"]
        took = time.time() - start
        # Started together: the unplaceable one gets twice what the placeable one needed, and more.
        ready, _ = ray.wait([unplaceable.ping.remote()], timeout=max(took, 10.0))
        assert not ready
    finally:
        ray.kill(placeable)
        ray.kill(unplaceable)
