"""Build tiny real Hugging Face models on disk for tests: a BPE tokenizer trained offline on Python's own
standard-library source, a Llama target trained for a few seconds on the same text, and drafts that
share its tokenizer.

Exactness holds whatever the weights; the brief training gives the target peaked, repetitive
distributions like a real model's, so drafts (prompt lookup included) are accepted at T > 0 and the
sampling tests reach every draft position. Nothing is shipped: tests build these in seconds and load
them through the same `from_pretrained` path as any real model.

    python -m tools.make_tiny_models OUT_DIR
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS_MODULES = ("argparse.py", "dataclasses.py", "functools.py", "textwrap.py", "json/decoder.py")


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text() for name in CORPUS_MODULES]


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def make_llama(vocab_size: int, hidden: int, layers: int, seed: int, eos: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=eos,
        bos_token_id=eos, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wider logits than the default init: fewer near-ties in greedy tests
        model.lm_head.weight.normal_(0.0, 0.2)
    return model.eval()


def train(model: LlamaForCausalLM, tokenizer, steps: int = 400, seed: int = 0) -> LlamaForCausalLM:
    """Next-token training on the corpus (~8 s on 2 cores): loss 7.2 -> ~2.1 nats."""
    ids = torch.tensor(tokenizer.encode("\n".join(corpus())))
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (32,), generator=gen)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def build(out: Path) -> dict[str, Path]:
    """Write target/ (briefly trained), draft_noisy/ (target + noise: partial acceptance), draft_small/
    (unrelated random weights: near-zero acceptance)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    target = train(make_llama(vocab, hidden=64, layers=2, seed=0, eos=eos), tokenizer)
    noisy = make_llama(vocab, hidden=64, layers=2, seed=1, eos=eos)
    noisy.load_state_dict(target.state_dict())
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.4 * p.std())
    small = make_llama(vocab, hidden=32, layers=1, seed=3, eos=eos)
    paths = {}
    for name, model in (("target", target), ("draft_noisy", noisy), ("draft_small", small)):
        paths[name] = out / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    for name, path in build(parser.parse_args().out).items():
        print(f"{name}: {path}")
