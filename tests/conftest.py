"""Shared fixtures: tiny real models built on disk once per session and loaded with from_pretrained."""

from __future__ import annotations

import os

import pytest
import torch

from cluster.config import DrafterConfig, EngineConfig, ModelConfig, SpeculationConfig
from cluster.drafters.configs import ModelDrafterConfig
from cluster.engine import SpecEngine
from tools.make_tiny_models import build

# Two cores here. Mutation testing forks test processes, and a child forked after torch has started its
# thread pool can hang: `SPECDEC_TEST_THREADS=1 OMP_NUM_THREADS=1 mutmut run` (the README says so).
torch.set_num_threads(int(os.environ.get("SPECDEC_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def make_engine(tiny_models):
    """make_engine(kind, k, draft='draft_noisy', adaptive, rule, **limits) -> SpecEngine over the tiny target."""

    def factory(kind: str = "ngram", k: int = 4, draft: str = "draft_noisy", adaptive: bool = False,
                rule: str = "coupled", backend: str = "auto", dtype: str = "float32", **limits):
        config = EngineConfig(
            target=ModelConfig(str(tiny_models["target"]), dtype=dtype, backend=backend),
            drafter=drafter_config(tiny_models, kind, draft, backend, dtype),
            speculation=SpeculationConfig(k=k, k_max=8, adaptive=adaptive, rule=rule),
        )
        for key, value in limits.items():
            setattr(config.limits, key, value)
        return SpecEngine(config.validate())

    return factory


def drafter_config(tiny_models, kind: str, draft: str = "draft_noisy", backend: str = "auto",
                   dtype: str = "float32") -> DrafterConfig:
    if kind == "model":
        return DrafterConfig("model", {"model": ModelDrafterConfig(str(tiny_models[draft]), dtype=dtype,
                                                                   backend=backend)})
    return DrafterConfig(kind)
