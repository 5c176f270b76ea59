"""Load real Hugging Face models with `from_pretrained` from a local directory (never from a hub), choose
their dtype and device, and wrap them in the fastest backend that covers them."""

from __future__ import annotations

import functools
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.model_config import ModelConfig, check_model_dir
from cluster.models import megabyte  # registers the MEGABYTE config and model with the Auto classes

log = logging.getLogger(__name__)


@functools.cache
def fast_bf16(device: str) -> bool:
    """Whether bf16 matmuls run natively: a GPU with bf16, or a CPU with AMX or avx512_bf16."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(cfg: ModelConfig, device: str) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return getattr(torch, cfg.dtype)


def resolve_device(cfg: ModelConfig, default: str) -> str:
    return default if cfg.device == "auto" else cfg.device


def load_model(cfg: ModelConfig, device: str = "cpu") -> torch.nn.Module:
    check_model_dir("model", cfg)
    device = resolve_device(cfg, device)
    if cfg.backend == "offload":  # a flash bundle: only the resident tensors are loaded
        from cluster.models.offload import load_skeleton

        if device != "cpu":
            raise ValueError(f"backend offload runs on cpu, not {device}")
        return load_skeleton(cfg.path, resolve_dtype(cfg, device))
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path, dtype=resolve_dtype(cfg, device), local_files_only=True, attn_implementation="sdpa", **kwargs
    )
    return model.to(device).eval()


def build_backend(model: torch.nn.Module, cfg: ModelConfig | None, num_slots: int, capacity: int):
    """The lean backend where it covers the model (or where asked for), else Hugging Face eager."""
    from cluster.models.backend import HFBackend
    from cluster.models.lean import LeanBackend, supports

    choice = cfg.backend if cfg is not None else "auto"
    if isinstance(model, megabyte.MegabyteForCausalLM):  # two levels: only its own backend runs it
        from cluster.models.megabyte_backend import MegabyteBackend

        return MegabyteBackend(model, num_slots, capacity)
    if choice == "offload":
        from cluster.models.offload import OffloadedBackend

        return OffloadedBackend(model, num_slots, capacity, cfg.path, cfg.memory_budget_gb)
    if choice == "hf":
        return HFBackend(model, num_slots, capacity)
    why_not = supports(model)
    if why_not is None:
        return LeanBackend(model, num_slots, capacity, graphs="auto" if cfg is None or cfg.cuda_graphs else "off")
    if choice == "lean":
        raise ValueError(f"backend: lean does not cover this model ({why_not})")
    log.warning("lean backend does not cover this model (%s): using Hugging Face eager", why_not)
    return HFBackend(model, num_slots, capacity)


def load_tokenizer(cfg: ModelConfig):
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    return AutoTokenizer.from_pretrained(cfg.path, local_files_only=True, **kwargs)
