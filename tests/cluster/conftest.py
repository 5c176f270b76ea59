"""A real local Ray (num_cpus=2) with the custom resources the pools ask for; shut down after the module."""

from __future__ import annotations

import pytest
import ray

from cluster.config import ClusterConfig, EngineConfig, ModelConfig, PoolConfig, SpeculationConfig
from tests.conftest import drafter_config


def cluster_config(tiny_models, *, k=3, kind="model", draft="draft_noisy", replicas=2, pipelining="continue",
                   adaptive=False, rule="coupled", **limits) -> EngineConfig:
    pool = dict(replicas=replicas, num_cpus=0, torch_threads=1)
    config = EngineConfig(
        target=ModelConfig(str(tiny_models["target"]), dtype="float32"),
        drafter=drafter_config(tiny_models, kind, draft),
        speculation=SpeculationConfig(k=k, k_max=8, adaptive=adaptive, rule=rule),
        cluster=ClusterConfig(
            target_pool=PoolConfig(resources={"target_node": 1}, **pool),
            draft_pool=PoolConfig(resources={"draft_node": 1}, **pool),
            pipelining=pipelining,
        ),
    )
    for key, value in limits.items():
        setattr(config.limits, key, value)
    return config.validate()


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, resources={"target_node": 8, "draft_node": 8}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
