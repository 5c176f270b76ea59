"""Load real Hugging Face models with `from_pretrained` from a local directory: never from a hub."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.model_config import ModelConfig, check_model_dir


def load_model(cfg: ModelConfig, device: str = "cpu") -> torch.nn.Module:
    check_model_dir("model", cfg)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path, dtype=getattr(torch, cfg.dtype), local_files_only=True, attn_implementation="sdpa", **kwargs
    )
    return model.to(device).eval()


def load_tokenizer(cfg: ModelConfig):
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    return AutoTokenizer.from_pretrained(cfg.path, local_files_only=True, **kwargs)
