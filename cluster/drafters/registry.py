"""Drafter kinds by config name. Adding a drafter is one file and one line here."""

from __future__ import annotations

from cluster.config import DrafterConfig

DRAFTERS = {
    "ngram": "prompt lookup over the sequence's own tokens; no model",
    "model": "a small causal LM sharing the target's tokenizer",
}


def build_drafter(cfg: DrafterConfig, num_slots: int, capacity: int, target_vocab: int, device: str = "cpu",
                  eos_ids: tuple[int, ...] = ()):
    """Instantiate the drafter named by `cfg.kind` (imports model code only when it is needed)."""
    cfg.validate("drafter")
    if cfg.kind == "ngram":
        from cluster.drafters.ngram import NgramDrafter

        return NgramDrafter(cfg.ngram_min, cfg.ngram_max)
    from cluster.drafters.model_drafter import ModelDrafter
    from cluster.models.loader import load_model
    from cluster.models.runner import ModelRunner

    runner = ModelRunner(load_model(cfg.model, device), num_slots, capacity)
    if runner.vocab_size != target_vocab:
        raise ValueError(f"drafter.model: vocabulary {runner.vocab_size} != target's {target_vocab}")
    return ModelDrafter(runner, cfg.confidence_threshold, eos_ids)
