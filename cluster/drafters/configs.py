"""Each drafter kind's own config section (plain data: validating a config never imports torch)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.errors import ConfigError
from cluster.model_config import ModelConfig, check_model_dir


@dataclass
class NgramConfig:
    ngram_min: int = 1  # shortest suffix to look up
    ngram_max: int = 4  # longest suffix to look up

    def validate(self, key: str, check_paths: bool = True) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"{key}.ngram_min/ngram_max: need 1 <= ngram_min <= ngram_max")


@dataclass
class ModelDrafterConfig(ModelConfig):
    """A small causal LM sharing the target's tokenizer."""

    confidence_threshold: float = 0.0  # stop a draft after a token the draft gives less than this

    def validate(self, key: str, check_paths: bool = True) -> None:
        ModelConfig.validate(self, key)
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ConfigError(f"{key}.confidence_threshold: must be in [0, 1)")
        if check_paths:
            check_model_dir(key, self)
