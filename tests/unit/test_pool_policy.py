"""Shared pools without Ray: slot leases never over-commit a worker, and each pool's scaling decision."""

import random

import pytest

from cluster.config import ConfigError, SharedPoolsConfig
from cluster.pools.manager import PoolManager, RouterReport
from cluster.pools.policy import PoolLoad, ScalingRule, grant, target_replicas


def test_grant_keeps_what_is_held_grows_into_free_slots_and_shares_under_contention():
    assert grant(8, 0, usage=0, demand=0, contenders=1) == 1  # headroom: the next request needs no round trip
    assert grant(8, 0, usage=3, demand=10, contenders=1) == 8  # alone: all it wants, up to the slots
    assert grant(8, 6, usage=0, demand=5, contenders=2) == 2  # only what the other leaves free
    assert grant(8, 0, usage=0, demand=8, contenders=2) == 4  # an even share while another wants slots
    assert grant(8, 8, usage=3, demand=5, contenders=2) == 3  # never below what it holds


class _Pool:
    """The part of an ActorPool the lease logic reads: ids of live workers."""

    def __init__(self, workers):
        self.handles = {w: object() for w in workers}

    def ready(self):
        return list(self.handles)


def test_routers_admitting_on_their_leases_never_over_commit_a_worker():
    """Three routers admit and finish requests at random, each honouring the lease of the last answer it
    got (answers arrive one report late, as in the PoolClient); the slots in use never exceed a
    worker's cache, and every router gets slots."""
    rng = random.Random(0)
    slots = 6
    manager = PoolManager({"target": _Pool(["target-0", "target-1"])}, {"target": slots},
                          {"target": ScalingRule()}, {})
    routers = {f"r{i}": {"usage": {"target-0": 0, "target-1": 0}, "lease": {}, "waiting": 0, "pending": None}
               for i in range(3)}
    served = {r: 0 for r in routers}
    for _ in range(3000):
        name = rng.choice(list(routers))
        r = routers[name]
        r["waiting"] += rng.random() < 0.5
        for worker in r["usage"]:  # finish some, admit within the lease in force
            if r["usage"][worker] and rng.random() < 0.3:
                r["usage"][worker] -= 1
            while r["waiting"] and r["usage"][worker] < r["lease"].get(worker, 0):
                r["usage"][worker] += 1
                r["waiting"] -= 1
                served[name] += 1
        for worker in ("target-0", "target-1"):
            assert sum(x["usage"][worker] for x in routers.values()) <= slots
        if r["pending"] is not None:  # the answer to the previous report arrives now
            r["lease"] = {w: lease for w, (_, lease) in r["pending"].workers["target"].items()}
        held = {w: max(r["lease"].get(w, 0), u) for w, u in r["usage"].items()}
        r["pending"] = manager.sync(name, RouterReport(dict(r["usage"]), held, {"target": r["waiting"]}))
    assert min(served.values()) > 100


def test_a_draining_worker_offers_only_what_is_held():
    manager = PoolManager({"target": _Pool(["target-0", "target-1"])}, {"target": 4}, {"target": ScalingRule()}, {})
    manager.draining.add("target-1")
    view = manager.sync("r0", RouterReport({"target-0": 1, "target-1": 2}, {}, {"target": 5}))
    assert view.workers["target"]["target-1"][1] == 2 and view.workers["target"]["target-0"][1] == 4
    assert manager.sizes()["target"] == 1


def test_draft_pool_grows_when_steps_wait_on_drafts_and_shrinks_when_idle():
    rule = ScalingRule(min_replicas=1, max_replicas=3, grow_at=0.3, shrink_below=0.1)
    bound = PoolLoad(seconds=5, step_s=10, draft_wait_s=6, busy_s=4.5)  # steps waited 60% of their time
    assert target_replicas(1, bound, rule, draft_pool=True) == 2
    assert target_replicas(3, bound, rule, draft_pool=True) == 3  # bounded
    idle = PoolLoad(seconds=5, step_s=10, draft_wait_s=0.1, busy_s=0.2)
    assert target_replicas(2, idle, rule, draft_pool=True) == 1
    assert target_replicas(1, idle, rule, draft_pool=True) == 1
    steady = PoolLoad(seconds=5, step_s=10, draft_wait_s=1, busy_s=3)
    assert target_replicas(2, steady, rule, draft_pool=True) == 2


def test_target_pool_grows_on_queue_at_busy_workers_and_shrinks_only_without_a_queue():
    rule = ScalingRule(min_replicas=1, max_replicas=2, grow_at=0.9, shrink_below=0.1)
    assert target_replicas(1, PoolLoad(seconds=5, busy_s=4.8, waiting=3), rule, draft_pool=False) == 2
    assert target_replicas(1, PoolLoad(seconds=5, busy_s=2.0, waiting=3), rule, draft_pool=False) == 1
    assert target_replicas(2, PoolLoad(seconds=5, busy_s=0.2), rule, draft_pool=False) == 1
    assert target_replicas(2, PoolLoad(seconds=5, busy_s=0.2, waiting=1), rule, draft_pool=False) == 2


@pytest.mark.parametrize("field, value", [("scale_interval_s", 0), ("draft_grow_at", 1.5), ("shrink_below", 0.5),
                                          ("router_timeout_s", -1), ("idle_exit_s", -1), ("name", "")])
def test_shared_pools_config_refuses_bad_values(field, value):
    config = SharedPoolsConfig(**{field: value})
    with pytest.raises(ConfigError, match=field):
        config.validate("cluster.shared_pools")
