"""Each drafter kind's own config section (plain data: validating a config never imports torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    # Draft over this many most frequent tokens only (FR-Spec; ranked on Python stdlib sources, plus the
    # end-of-sequence ids); 0: the whole vocabulary. Output is exact either way; the head costs less.
    vocab: int = 0

    def validate(self, key: str, check_paths: bool = True) -> None:
        ModelConfig.validate(self, key)
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ConfigError(f"{key}.confidence_threshold: must be in [0, 1)")
        if self.vocab < 0:
            raise ConfigError(f"{key}.vocab: must be >= 0")
        if self.vocab and self.backend == "hf":
            raise ConfigError(f"{key}.vocab: a reduced head needs the lean backend (backend auto or lean)")
        if check_paths:
            check_model_dir(key, self)


@dataclass
class SuffixConfig:
    """Search drafting over each request, recent outputs and an optional corpus."""

    max_context: int = 8  # longest context (tokens) the indexes match
    alpha: float = 2.0  # a draft goes no deeper than alpha x the matched context length
    min_score: float = 0.1  # a node's path frequency must reach this
    max_width: int = 3  # children per node at most
    shared_requests: int = 256  # recent requests whose outputs are in the shared index
    corpus_glob: str = ""  # files to index once at start (relative to the working directory), e.g. "**/*.py"
    corpus_tokens: int = 2_000_000

    def validate(self, key: str, check_paths: bool = True) -> None:
        if self.max_context < 1 or self.max_width < 1 or self.shared_requests < 0 or self.corpus_tokens < 0:
            raise ConfigError(f"{key}: max_context, max_width >= 1; shared_requests, corpus_tokens >= 0")
        if self.alpha <= 0 or not 0 < self.min_score <= 1:
            raise ConfigError(f"{key}: alpha > 0 and min_score in (0, 1]")


@dataclass
class LayerSkipConfig:
    """A compressed copy of the target without training: its first `layers` layers, its final norm and LM
    head (sharing the target's weights when in the same process)."""

    layers: int = 8

    def validate(self, key: str, check_paths: bool = True) -> None:
        if self.layers < 1:
            raise ConfigError(f"{key}.layers: must be >= 1")


@dataclass
class MultiConfig:
    """Several drafters at once, their proposals merged into one token tree."""

    members: list[str] = field(default_factory=list)  # drafter kinds, each configured in its own section beside this one
    # Members asked only for the requests the others drafted fewer than `fallback_below` nodes for: a
    # drafter that costs a real fraction of a pass (heads: ~6 ms a call here) where the searches found little.
    fallback: list[str] = field(default_factory=list)
    fallback_below: int = 4

    def validate(self, key: str, check_paths: bool = True) -> None:
        if not self.members or not all(isinstance(m, str) for m in self.members) or "multi" in self.members:
            raise ConfigError(f"{key}.members: a list of drafter kinds (not multi)")
        if not set(self.fallback) <= set(self.members) or set(self.fallback) == set(self.members):
            raise ConfigError(f"{key}.fallback: some of the members, not all of them")
        if self.fallback_below < 1:
            raise ConfigError(f"{key}.fallback_below: must be >= 1")


@dataclass
class HeadsConfig:
    """Draft heads on the target's last hidden state (cluster/drafters/heads.py: hydra, a step network over
    the pending token and each guess, or medusa, parallel heads), through the target's own LM head.
    `path` holds the weights tools/train_heads.py writes (relative to the config file)."""

    path: str = ""
    top_k: int = 3  # candidates per head; the tree takes the likeliest paths that fit the budget
    vocab: int = 0  # hydra: propose only the first this many of the tokens it was trained on (0: all of them)

    def validate(self, key: str, check_paths: bool = True) -> None:
        if self.top_k < 1:
            raise ConfigError(f"{key}.top_k: must be >= 1")
        if self.vocab < 0:
            raise ConfigError(f"{key}.vocab: must be >= 0")
        if check_paths and not (Path(self.path) / "heads.safetensors").is_file():
            raise ConfigError(f"{key}.path: {self.path!r} holds no heads.safetensors (python -m tools.train_heads)")

    def resolve(self, base: Path) -> None:
        if self.path and not Path(self.path).is_absolute():
            self.path = str((base / self.path).resolve())


@dataclass
class MegabyteLocalConfig:
    """MEGABYTE's local model drafting on the draft tier: read from the target's own directory."""

    def validate(self, key: str, check_paths: bool = True) -> None:
        pass


@dataclass
class SparseConfig:
    """The offloaded target's own hot neurons as its draft ("LLM in a flash" sparsity, kept exact by
    verification): resident attention and embeddings, the FFN over the neurons cached in DRAM only."""

    vocab: int = 32768  # draft over this many most frequent tokens (a frequency-ordered head, FR-Spec); 0: all
    confidence_threshold: float = 0.0  # stop a draft after a token the draft gives less than this
    # The draft's FFN: "hot" (the cached neurons, bf16) or "int4" (every neuron, an int4 copy cast from the
    # bundle at load time, its bytes taken from the target's budget: the cache shrinks to make room).
    ffn: str = "hot"
    group: int = 32  # int4: input features sharing one scale and zero point (32, 64, 128 or 256)

    def validate(self, key: str, check_paths: bool = True) -> None:
        if self.vocab < 0:
            raise ConfigError(f"{key}.vocab: must be >= 0")
        if self.ffn not in ("hot", "int4"):
            raise ConfigError(f"{key}.ffn: {self.ffn!r} is not one of 'hot', 'int4'")
        if self.group not in (32, 64, 128, 256):
            raise ConfigError(f"{key}.group: {self.group} is not one of 32, 64, 128, 256")
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ConfigError(f"{key}.confidence_threshold: must be in [0, 1)")


@dataclass
class QuantizedConfig:
    """A compressed copy of the target without training: its linear layers quantized, the rest as it is.
    format: int8 (torch's dynamic quantization, CPU only), int4 (weight-only, `group` inputs a scale and
    zero; CPU and CUDA) or fp8 (e4m3 weights and activations, CUDA's fp8 tensor cores; on CPU an emulation
    that multiplies by the same values, slowly: for measuring acceptance). cluster/models/quantized.py."""

    format: str = "int8"
    group: int = 32  # int4: input features sharing one scale and zero point (32, 64, 128 or 256)
    confidence_threshold: float = 0.0  # stop a draft after a token the copy gives less than this

    def validate(self, key: str, check_paths: bool = True) -> None:
        if self.format not in ("int8", "int4", "fp8"):
            raise ConfigError(f"{key}.format: {self.format!r} is not one of 'int8', 'int4', 'fp8'")
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ConfigError(f"{key}.confidence_threshold: must be in [0, 1)")
        if self.group not in (32, 64, 128, 256):
            raise ConfigError(f"{key}.group: {self.group} is not one of 32, 64, 128, 256")
