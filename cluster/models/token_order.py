"""Token ids by frequency, most frequent first: the rows a frequency-ranked draft head keeps (FR-Spec,
Zhao et al. 2025). Which tokens a draft may propose never changes the output (every one is verified);
it only changes how often the draft is right."""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import torch


def token_order(tokenizer, vocab: int, tokens: int) -> torch.Tensor:
    """Token ids by frequency in stdlib sources, most frequent first (ids never seen keep their order)."""
    counts = torch.zeros(vocab, dtype=torch.long)
    seen = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        ids = torch.tensor(tokenizer(path.read_text(errors="replace"))["input_ids"], dtype=torch.long)
        counts += torch.bincount(ids[ids < vocab], minlength=vocab)
        seen += len(ids)
        if seen >= tokens:
            break
    return torch.argsort(counts, descending=True, stable=True)


@functools.cache
def _cached_order(model_path: str, vocab: int, tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    return token_order(AutoTokenizer.from_pretrained(model_path, local_files_only=True), vocab, tokens)


def frequent_ids(model_path: str, vocab: int, keep: int, always: tuple[int, ...] = (),
                 tokens: int = 1_000_000) -> torch.Tensor:
    """The `keep` most frequent token ids of the model's tokenizer, plus `always` (its end-of-sequence
    ids: a draft that cannot propose them drafts past every ending), in frequency order."""
    order = _cached_order(str(model_path), vocab, tokens)
    top = order[:keep].tolist()
    extra = [i for i in dict.fromkeys(always) if 0 <= i < vocab and i not in set(top)]
    return torch.tensor(top + extra, dtype=torch.long)
