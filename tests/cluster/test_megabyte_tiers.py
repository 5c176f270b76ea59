"""MEGABYTE on two tiers (issue 13): the global model in target actors, the local model in draft actors,
patches of different requests pipelined; real Ray, tiny random weights."""

from cluster.config import ClusterConfig, DrafterConfig, EngineConfig, ModelConfig, PoolConfig, SpeculationConfig
from cluster.router import Router
from cluster.types import SamplingParams
from tests.engine.test_megabyte import PROMPTS, _engine, tiny_megabyte  # noqa: F401 (the fixture)


def test_the_two_tier_ray_run_equals_the_in_process_run(ray_local, tiny_megabyte):
    pool = dict(replicas=1, num_cpus=0, torch_threads=1)
    config = EngineConfig(
        target=ModelConfig(str(tiny_megabyte), dtype="float32"), drafter=DrafterConfig("megabyte_local"),
        speculation=SpeculationConfig(k=8, k_max=8, adaptive=False),
        cluster=ClusterConfig(target_pool=PoolConfig(resources={"target_node": 1}, **pool),
                              draft_pool=PoolConfig(resources={"draft_node": 1}, **pool), pipelining="split"))
    config.limits.max_model_len = 256
    router = Router(config.validate())
    try:
        router.wait_ready()
        plain = _engine(tiny_megabyte, 0)
        prompts = PROMPTS * 2  # 8 streams: two groups whose patches alternate between the tiers
        for params in (SamplingParams(max_tokens=40), [SamplingParams(max_tokens=40, temperature=0.9, seed=i)
                                                       for i in range(len(prompts))]):
            expected = [o.token_ids for o in plain.generate(prompts, params)]
            assert [o.token_ids for o in router.generate(prompts, params)] == expected
        assert router.stats.accepted >= 0.95 * router.stats.drafted > 0
        assert router.pipelined_steps > 0  # the global tier verified one group while the local tier drafted the other
        loads = router.worker_loads()
        assert all(load["sequences"] == 0 for load in loads["target"] + loads["draft"])  # every slot freed
    finally:
        router.shutdown()
