"""Where a model comes from: a local directory (safetensors or a GGUF file in it), and its dtype.
Plain data: imported by the engine config and by drafter configs alike, without torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.errors import ConfigError, ModelNotFoundError

DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "lean", "hf", "offload")


@dataclass
class ModelConfig:
    path: str = ""
    dtype: str = "auto"  # auto: bfloat16 where the hardware has fast bf16 (AMX / avx512_bf16 CPUs, GPUs), else float32
    gguf_file: str | None = None  # load a GGUF file inside `path` instead of safetensors
    backend: str = "auto"  # auto: the lean forward where it covers the model, else Hugging Face eager (logged)
    device: str = "auto"  # auto: where the worker runs (cuda if it has a GPU); or cpu, cuda, cuda:1, ...
    # lean backend on a GPU: replay CUDA graphs of decode steps and chain verifies (cluster/models/cuda_graphs.py)
    cuda_graphs: bool = True
    # backend offload: `path` is a flash bundle (tools/bundle_ffn.py) whose FFN streams from storage; the
    # weights held in DRAM (resident tensors, two layer buffers, the hot-neuron cache) stay within this.
    memory_budget_gb: float = 0.0

    def validate(self, key: str) -> None:
        if not self.path:
            raise ConfigError(f"{key}.path: required")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{key}.dtype: {self.dtype!r} is not one of {DTYPES}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{key}.backend: {self.backend!r} is not one of {BACKENDS}")
        if self.backend == "offload" and not self.memory_budget_gb > 0:
            raise ConfigError(f"{key}.memory_budget_gb: backend offload needs a DRAM budget > 0")
        if self.backend != "offload" and self.memory_budget_gb:
            raise ConfigError(f"{key}.memory_budget_gb: only backend offload has a DRAM budget")

    def resolve(self, base: Path) -> None:
        """Relative paths are relative to the config file that names them."""
        if self.path and not Path(self.path).is_absolute():
            self.path = str((base / self.path).resolve())


def check_model_dir(key: str, model: ModelConfig) -> None:
    path = Path(model.path)
    if not path.is_dir():
        raise ModelNotFoundError(f"{key}.path: model directory {str(path)!r} does not exist")
    wanted = [model.gguf_file] if model.gguf_file else ["config.json"]
    if model.backend == "offload":
        wanted += ["bundle.json", "resident.safetensors", "ffn.bin", "neurons.safetensors"]
    for name in wanted:
        if not (path / name).is_file():
            raise ModelNotFoundError(f"{key}.path: {str(path)!r} has no {name}")
