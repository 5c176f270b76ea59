"""Rewrite a Llama-family model (Llama, SmolLM2, Qwen2) into a flash bundle: each FFN neuron's gate row, up
row and down column stored side by side, neurons ordered hottest first, everything else in one resident
file. The layout is in `cluster/models/flash_store.py`; the offloaded backend reads it.

Hotness is each neuron's mean |activation| over calibration text (the model's own activations on Python
sources installed on this machine), so the DRAM cache starts from the neurons most tokens need and a
verify pass streams the colder rest in long sequential reads.

    python -m tools.bundle_ffn models/qwen2.5-coder-1.5b-instruct models/qwen2.5-coder-1.5b-flash \
        [--dtype bfloat16] [--calibration-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cluster.models.flash_store import BundleLayout, aligned_buffer, drop_from_page_cache
from cluster.models.token_order import token_order

FFN = ("gate_proj", "up_proj", "down_proj")
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


class Tensors:
    """The tensors of a safetensors model directory (one file or an index of shards), read one at a time."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(directory / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        self.files = {name: directory / file for name, file in weight_map.items()}
        self._open: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path].get_tensor(name)


def calibration_text(tokens: int, tokenizer) -> torch.Tensor:
    """Python sources of the standard library, in a fixed order: offline text any machine here has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for path in sorted(root.glob("*.py")):
        ids.extend(tokenizer(path.read_text(errors="replace"))["input_ids"])
        if len(ids) >= tokens:
            break
    return torch.tensor(ids[:tokens])


@torch.inference_mode()
def hotness(source: Path, tokens: int, dtype: torch.dtype, window: int = 512) -> list[torch.Tensor]:
    """Per layer, each neuron's mean |act(gate) * up| over the calibration text, in original order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    ids = calibration_text(tokens, tokenizer)
    sums = [torch.zeros(layer.mlp.down_proj.in_features) for layer in model.model.layers]

    def record(i: int):
        def hook(_module, args) -> None:  # returns None: a pre-hook's return value would replace the input
            sums[i].add_(args[0].float().abs().sum(dim=(0, 1)))
        return hook

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(record(i)) for i, layer in enumerate(model.model.layers)]
    start = time.perf_counter()
    for n, lo in enumerate(range(0, len(ids), window)):
        model.model(ids[lo:lo + window].unsqueeze(0))  # the FFN inputs are all it needs: no LM head
        print(f"\rcalibration {min(lo + window, len(ids))}/{len(ids)} tokens, {time.perf_counter() - start:.0f} s",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for h in hooks:
        h.remove()
    del model
    return [s / len(ids) for s in sums]


def bundle(source: Path, dest: Path, dtype: str = "bfloat16", calibration_tokens: int = 4096,
           vocab_tokens: int = 1_000_000) -> BundleLayout:
    config = json.loads((source / "config.json").read_text())
    if config.get("architectures", [""])[0] not in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        raise ValueError(f"{source}: bundling covers Llama and Qwen2 models, not {config.get('architectures')}")
    tdtype = getattr(torch, dtype)
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tied = config.get("tie_word_embeddings", False)
    tensors = Tensors(source)
    embed_name = "model.embed_tokens.weight"
    vocab = config["vocab_size"]
    # An untied embedding is only looked up (a pass needs its tokens' rows): it goes to storage too.
    layout = BundleLayout.plan(hidden, inter, layers, dtype, embed_rows=0 if tied else vocab)
    heat = hotness(source, calibration_tokens, tdtype) if calibration_tokens else None
    dest.mkdir(parents=True, exist_ok=True)
    resident, neurons = {}, {}
    for name in tensors.names():
        if not any(f".mlp.{p}." in name for p in FFN) and (tied or name != embed_name):
            resident[name] = tensors.get(name).to(tdtype).contiguous()
    if not tied and vocab_tokens:
        # The untied head's rows, most frequent token first: a draft can use a prefix of them (a
        # frequency-ranked vocabulary, FR-Spec) with no copy; the target puts its logits back in order.
        from transformers import AutoTokenizer

        order = token_order(AutoTokenizer.from_pretrained(source, local_files_only=True), vocab, vocab_tokens)
        resident["lm_head.weight"] = resident["lm_head.weight"][order].contiguous()
        neurons["vocab.order"] = order.to(torch.int32)
    if not tied:
        embed = tensors.get(embed_name).to(tdtype).contiguous()
        if embed.shape != (vocab, hidden):
            raise ValueError(f"{embed_name}: shape {tuple(embed.shape)}, config says {(vocab, hidden)}")
        (dest / "embed.bin").write_bytes(embed.view(torch.uint8).numpy().tobytes())
        del embed
    save_file(resident, dest / "resident.safetensors", metadata={"format": "pt"})
    del resident
    stride = layout.layer_offsets[1] - layout.layer_offsets[0] if layers > 1 else layout.layer_bytes
    buf = aligned_buffer(stride)
    start = time.perf_counter()
    with open(dest / "ffn.bin", "wb") as out:
        for li in range(layers):
            prefix = f"model.layers.{li}.mlp."
            gate, up, down = (tensors.get(prefix + p + ".weight").to(tdtype) for p in FFN)
            order = torch.argsort(heat[li], descending=True, stable=True) if heat else torch.arange(inter)
            rows = torch.stack([gate[order], up[order], down.t()[order]], dim=1)  # [I, 3, H]
            buf.zero_()
            buf[: layout.layer_bytes].copy_(rows.reshape(-1).view(torch.uint8))
            out.seek(layout.layer_offsets[li])
            out.write(buf.numpy().tobytes())
            neurons[f"layer.{li}.order"] = order.to(torch.int32)
            neurons[f"layer.{li}.hotness"] = (heat[li][order] if heat else torch.zeros(inter)).float()
            print(f"\rbundled layer {li + 1}/{layers}, {time.perf_counter() - start:.0f} s", end="",
                  file=sys.stderr, flush=True)
    print(file=sys.stderr)
    save_file(neurons, dest / "neurons.safetensors")
    layout.save(dest)
    meta = json.loads((dest / "bundle.json").read_text()) | {"calibration_tokens": calibration_tokens}
    (dest / "bundle.json").write_text(json.dumps(meta, indent=1) + "\n")  # held-out text starts after these
    for name in COPIED:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    for name in ("ffn.bin", "embed.bin"):  # the bundle was just written: reading it must hit storage
        if (dest / name).is_file():
            drop_from_page_cache(dest / name)
    return layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a safetensors model directory")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--calibration-tokens", type=int, default=4096,
                        help="tokens of stdlib source to rank neurons by (0: keep the original order)")
    parser.add_argument("--vocab-tokens", type=int, default=1_000_000,
                        help="tokens of stdlib source to rank an untied head's rows by (0: keep the order)")
    args = parser.parse_args()
    layout = bundle(args.source, args.dest, args.dtype, args.calibration_tokens, args.vocab_tokens)
    print(f"{args.dest}: {layout.layers} layers x {layout.intermediate} neurons x {layout.row_bytes} B "
          f"= {layout.ffn_bytes / 1e9:.2f} GB of FFN")


if __name__ == "__main__":
    main()
