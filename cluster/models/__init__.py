"""Hugging Face causal LMs loaded from local directories, run through backends over slot KV caches."""
