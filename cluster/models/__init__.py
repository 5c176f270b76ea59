"""Hugging Face causal LMs loaded from local directories, run over ragged batches with rollback-able caches."""

from cluster.models.kv_cache import SlotKVCache
from cluster.models.loader import load_model, load_tokenizer
from cluster.models.runner import ModelRunner

__all__ = ["ModelRunner", "SlotKVCache", "load_model", "load_tokenizer"]
