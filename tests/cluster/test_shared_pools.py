"""Shared pools on a real local Ray: routers share one target and one draft pool under leases, the draft
pool scales 1 -> 2 -> 1 with measured load, and a dead router's sequences and leases come back."""

import time
import uuid

import pytest
import ray

from cluster.router import Router
from cluster.types import SamplingParams
from tests.cluster.conftest import cluster_config
from tests.cluster.test_router import PARAMS, PROMPTS

pytestmark = pytest.mark.slow


def shared_config(tiny_models, **overrides):
    draft_max = overrides.pop("draft_max", 0)
    config = cluster_config(tiny_models, replicas=1, **overrides)
    pools = config.cluster.shared_pools
    pools.enabled, pools.name = True, f"pools-{uuid.uuid4().hex[:6]}"
    pools.scale_interval_s, pools.router_timeout_s, pools.idle_exit_s = 1.0, 2.0, 0.0
    config.cluster.draft_pool.max_replicas = draft_max
    return config.validate()


def _manager(config):
    pools = config.cluster.shared_pools
    return ray.get_actor(pools.name, namespace=pools.namespace)


@pytest.fixture
def pools_cleanup():
    configs = []
    yield configs.append
    for config in configs:
        try:
            manager = _manager(config)
            ray.get(manager.shutdown.remote())
            ray.kill(manager)
        except ValueError:  # never started
            pass


@pytest.fixture(scope="module")
def reference(make_engine):
    return [o.token_ids for o in make_engine("ngram", k=0).generate(PROMPTS, PARAMS)]


def _loads(manager) -> dict[str, list[dict]]:
    status = ray.get(manager.status.remote())
    handles = ray.get(manager.handles.remote())
    return {kind: ray.get([h.load.remote() for h in hs.values()]) for kind, hs in handles.items()} | {"status": status}


def test_the_draft_pool_grows_under_draft_bound_load_and_shrinks_when_idle(ray_local, tiny_models, make_engine,
                                                                           pools_cleanup):
    """Unpipelined model drafts of K = 6 make every step wait on drafting: the pool grows to 2; requests
    move to the new worker as they are admitted, and off the removed one when it goes; output stays exact."""
    params = [SamplingParams(max_tokens=40, min_tokens=40) for _ in PROMPTS]
    reference = [o.token_ids for o in make_engine("ngram", k=0).generate(PROMPTS, params)]
    config = shared_config(tiny_models, k=6, pipelining="off", max_batch_size=16, draft_max=2)
    pools_cleanup(config)
    router = Router(config)
    try:
        router.wait_ready()
        manager = _manager(config)
        outputs, rounds = [], 0
        while rounds < 6 and ray.get(manager.status.remote())["sizes"]["draft"] < 2:
            outputs.append([o.token_ids for o in router.generate(PROMPTS, params)])
            rounds += 1
        assert ray.get(manager.status.remote())["sizes"]["draft"] == 2, ray.get(manager.status.remote())
        outputs.append([o.token_ids for o in router.generate(PROMPTS, params)])  # on both workers
        assert all(out == reference for out in outputs)
        deadline = time.time() + 20
        while ray.get(manager.status.remote())["sizes"]["draft"] > 1 and time.time() < deadline:
            router.step()  # idle: only syncs
            time.sleep(0.2)
        log = [(kind, size) for _, kind, size in ray.get(manager.status.remote())["scaling_log"]]
        assert log == [("draft", 2), ("draft", 1)]
        assert [o.token_ids for o in router.generate(PROMPTS, params)] == reference  # on the one left
    finally:
        router.shutdown()


@ray.remote(num_cpus=0)
class RouterHost:
    """A router in its own process, as in a Serve replica: killing it kills the router."""

    def __init__(self, config):
        self.router = Router(config)
        self.router.wait_ready()

    def start(self, n: int) -> int:
        for prompt in PROMPTS[:n]:
            self.router.enqueue(self.router.build(prompt, SamplingParams(max_tokens=200, min_tokens=200)))
        for _ in range(3):
            self.router.step()
        return len(self.router.running)


def _peak_running(router) -> list[int]:
    peak, step = [0], router.step
    router.step = lambda: (out := step(), peak.__setitem__(0, max(peak[0], len(router.running))))[0]
    return peak


def test_two_routers_share_one_pool_under_leases_and_a_dead_ones_slots_come_back(ray_local, tiny_models, reference,
                                                                                pools_cleanup):
    """A router in its own process (as in a Serve replica) holds 4 of the one target worker's 8 slots; a
    second router runs 16 requests beside it within the other 4, exact. Killing the first frees its
    sequences on both workers and its lease: the second then runs 8 at once."""
    config = shared_config(tiny_models, max_batch_size=8)
    pools_cleanup(config)
    host = RouterHost.remote(config)
    router = Router(config)
    try:
        assert ray.get(host.start.remote(4)) == 4
        router.wait_ready()
        manager = _manager(config)
        assert set(router.targets.handles) == {"target-0"} and set(router.drafts.handles) == {"draft-0"}
        peak = _peak_running(router)
        assert [o.token_ids for o in router.generate(PROMPTS, PARAMS)] == reference
        # the host's 4 (and the one slot of headroom its lease keeps) stayed reserved: never over-committed
        assert 3 <= peak[0] <= 4
        loads = _loads(manager)
        assert len(loads["status"]["routers"]) == 2 and loads["status"]["sizes"] == {"target": 1, "draft": 1}
        assert loads["target"][0]["sequences"] == 4 and loads["draft"][0]["sequences"] == 4  # the host's
        ray.kill(host)
        deadline = time.time() + 15
        while len(ray.get(manager.status.remote())["routers"]) > 1 and time.time() < deadline:
            router.step()  # idle: keeps reporting
            time.sleep(0.2)
        loads = _loads(manager)
        assert loads["status"]["routers"] == [router.pool_client.router_id]
        assert loads["target"][0]["sequences"] == 0 and loads["target"][0]["cache_occupied"] == 0
        assert loads["draft"][0]["sequences"] == 0
        peak[0] = 0
        assert [o.token_ids for o in router.generate(PROMPTS[:8], PARAMS[:8])] == reference[:8]
        assert peak[0] == 8  # all eight ran at once: the dead router's slots are free
    finally:
        router.shutdown()
