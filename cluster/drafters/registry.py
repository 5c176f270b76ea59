"""Drafter kinds by config name. Adding a drafter is one file (with a `build`) and one entry here.
This module and the config sections it names import no torch: a config validates without it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from cluster.drafters.configs import (
    HeadsConfig,
    LayerSkipConfig,
    MegabyteLocalConfig,
    ModelDrafterConfig,
    MultiConfig,
    NgramConfig,
    QuantizedConfig,
    SparseConfig,
    SuffixConfig,
)


@dataclass(frozen=True)
class Kind:
    config: type  # the kind's config section (a dataclass with validate(key, check_paths))
    builder: str  # "module:function"; build(section, context) -> Drafter
    description: str
    # Runs a model: it samples from its own q, and its draft steps cost real time, one after another.
    model_based: bool = False
    reads_hidden: bool = False  # drafts from the target's hidden states (the verify passes return them)


DRAFTERS: dict[str, Kind] = {
    "ngram": Kind(NgramConfig, "cluster.drafters.ngram:build", "prompt lookup over the sequence's own tokens; no model"),
    "model": Kind(ModelDrafterConfig, "cluster.drafters.model_drafter:build", "a small causal LM sharing the tokenizer",
                  model_based=True),
    "suffix": Kind(SuffixConfig, "cluster.drafters.suffix:build", "search over each request, recent outputs, a corpus"),
    "layerskip": Kind(LayerSkipConfig, "cluster.drafters.model_drafter:build_layerskip",
                      "the target's first layers + head: a compressed copy, no training", model_based=True),
    "quantized": Kind(QuantizedConfig, "cluster.drafters.model_drafter:build_quantized",
                      "the target with int8, int4 or fp8 linear layers: a compressed copy, no training",
                      model_based=True),
    "sparse": Kind(SparseConfig, "cluster.drafters.model_drafter:build_sparse",
                   "an offloaded target's hot neurons in DRAM (its FFN over cached neurons only); reads no storage",
                   model_based=True),
    "multi": Kind(MultiConfig, "cluster.drafters.multi:build", "several drafters merged into one token tree"),
    "megabyte_local": Kind(MegabyteLocalConfig, "cluster.drafters.megabyte_local:build",
                           "MEGABYTE's local model on the draft tier, writing each patch from the target's conditioning",
                           model_based=True, reads_hidden=True),
    "heads": Kind(HeadsConfig, "cluster.drafters.heads:build",
                  "parallel heads on the target's last hidden state (Medusa-style), trained by tools/train_heads.py",
                  reads_hidden=True),
}


@dataclass
class BuildContext:
    """What a drafter is built with, besides its own section."""

    num_slots: int
    capacity: int
    target_vocab: int
    device: str = "cpu"
    eos_ids: tuple[int, ...] = ()
    rule: str = "coupled"
    target: object = None  # the target's ModelConfig (its tokenizer; its weights for a layer-skip draft)
    target_model: object = None  # the target itself when in the same process (weights shared), else None
    sections: dict | None = None  # every configured section (a multi drafter builds its members from them)


def build_drafter(kind: str, section, context: BuildContext):
    """Instantiate drafter `kind` (imports its module, and so torch, only now)."""
    module, function = DRAFTERS[kind].builder.split(":")
    return getattr(importlib.import_module(module), function)(section, context)
