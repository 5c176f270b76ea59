"""Shared fixtures: tiny real models built on disk once per session and loaded with from_pretrained."""

from __future__ import annotations

import pytest
import torch

from cluster.config import DrafterConfig, EngineConfig, ModelConfig, SpeculationConfig
from cluster.engine import SpecEngine
from tools.make_tiny_models import build

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def make_engine(tiny_models):
    """make_engine(kind, k, draft='draft_noisy', **spec) -> SpecEngine over the tiny target."""

    def factory(kind: str = "ngram", k: int = 4, draft: str = "draft_noisy", adaptive: bool = False, **limits):
        config = EngineConfig(
            target=ModelConfig(str(tiny_models["target"])),
            drafter=DrafterConfig(kind=kind, model=ModelConfig(str(tiny_models[draft])) if kind == "model" else None),
            speculation=SpeculationConfig(k=k, k_min=1, k_max=8, adaptive=adaptive),
        )
        for key, value in limits.items():
            setattr(config.limits, key, value)
        return SpecEngine(config.validate())

    return factory
