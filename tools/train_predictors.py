"""Per-layer low-rank predictors of active FFN neurons ("LLM in a flash", section 3.1), trained from the
model's own activations on offline text, and the sparsity-versus-fidelity curve they and plain magnitude
thresholds give.

A SwiGLU neuron is never exactly zero, so "active" means |act| in the top `density` of its layer at that
token: a magnitude threshold standing in for ReLU's zeros (TEAL). Predictor l maps the FFN input x [H] to
a score per neuron through rank r (x @ A @ B), trained with binary cross-entropy against those labels.

The curve: teacher-forced next-token agreement with the dense model on held-out text when every FFN runs
only (a) each token's true top-`density` neurons by magnitude (an oracle: what thresholds can reach) or
(b) the predictor's top-`density` neurons, or (c) a fixed set, the bundle's hottest rows (what a static
DRAM cache would hold; the offloaded backend's cache adds a window over recent tokens). Written to <bundle>/predictors.json with the predictors in
<bundle>/predictors.safetensors (rows in the bundle's neuron order).

    python -m tools.train_predictors models/qwen2.5-coder-1.5b-instruct models/qwen2.5-coder-1.5b-flash \
        [--tokens 2048] [--rank 64] [--density 0.3] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tools.bundle_ffn import calibration_text


@torch.inference_mode()
def collect(model, ids: torch.Tensor, window: int = 512) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: FFN inputs x [N, H] and activations act(gate) * up [N, I] (original neuron order)."""
    layers = model.model.layers
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    acts: list[list[torch.Tensor]] = [[] for _ in layers]

    def keep(store, i):
        def hook(_module, args) -> None:
            store[i].append(args[0].reshape(-1, args[0].shape[-1]).to(torch.bfloat16))
        return hook

    hooks = [layer.mlp.register_forward_pre_hook(keep(xs, i)) for i, layer in enumerate(layers)]
    hooks += [layer.mlp.down_proj.register_forward_pre_hook(keep(acts, i)) for i, layer in enumerate(layers)]
    for lo in range(0, len(ids), window):
        model.model(ids[lo:lo + window].unsqueeze(0))
    for h in hooks:
        h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(a) for a in acts]


def labels(act: torch.Tensor, density: float) -> torch.Tensor:
    """Each token's top-`density` neurons by |activation|."""
    k = max(1, int(density * act.shape[-1]))
    top = act.float().abs().topk(k, dim=-1).indices
    return torch.zeros(act.shape, dtype=torch.bool).scatter_(-1, top, True)


def train_layer(x: torch.Tensor, y: torch.Tensor, rank: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, i = x.shape[-1], y.shape[-1]
    a = (torch.randn(h, rank, generator=gen) / h ** 0.5).requires_grad_()
    b = torch.zeros(rank, i, requires_grad=True)
    bias = torch.zeros(i, requires_grad=True)
    opt = torch.optim.Adam([a, b, bias], lr=3e-3)
    xf, yf = x.float(), y.float()
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(xf @ a @ b + bias, yf)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return a.detach(), torch.cat([b.detach(), bias.detach().unsqueeze(0)])  # B's last row: the bias


def recall(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Of the truly active neurons, the fraction the predictor's top-k (same k) finds."""
    k = int(y.sum(-1).float().mean())
    score = x.float() @ a @ b[:-1] + b[-1]
    hit = torch.zeros_like(y).scatter_(-1, score.topk(k, dim=-1).indices, True)
    return float((hit & y).sum() / y.sum())


@torch.inference_mode()
def agreement(model, ids: torch.Tensor, dense: torch.Tensor, density: float, predictors=None,
              hot_order: list[torch.Tensor] | None = None) -> float:
    """Next-token agreement with `dense` argmaxes when each FFN keeps only top-`density` neurons per token."""
    layers = model.model.layers
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for li, layer in enumerate(layers):
        def stash(_m, args, li=li) -> None:
            inputs[li] = args[0]

        def mask(_m, args, li=li):
            act = args[0]
            k = max(1, int(density * act.shape[-1]))
            if predictors == "hot":  # a fixed set: the bundle's hottest rows (what a static cache holds)
                score = torch.empty(act.shape[-1])
                score[hot_order[li]] = -torch.arange(act.shape[-1], dtype=torch.float32)
                score = score.expand(act.shape)
            elif predictors is None:
                score = act.float().abs()
            else:
                a, b, order = predictors[li]
                score = torch.empty(act.shape, dtype=torch.float32)
                score[..., order] = inputs[li].float() @ a @ b[:-1] + b[-1]  # bundle order -> model order
            keep = torch.zeros(act.shape, dtype=torch.bool).scatter_(-1, score.topk(k, dim=-1).indices, True)
            return (act * keep,)

        hooks.append(layer.mlp.register_forward_pre_hook(stash))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mask))
    try:
        got = model(ids.unsqueeze(0)).logits[0].argmax(-1)
    finally:
        for h in hooks:
            h.remove()
    return float((got == dense).float().mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the dense model directory")
    parser.add_argument("bundle", type=Path, help="its flash bundle (tools/bundle_ffn.py): neuron order, output")
    parser.add_argument("--tokens", type=int, default=2048, help="training tokens")
    parser.add_argument("--eval-tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.3, help="fraction of neurons labelled active")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--curve", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.5, 0.7])
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.source, dtype=getattr(torch, args.dtype),
                                                 local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.source, local_files_only=True)
    skip = json.loads((args.bundle / "bundle.json").read_text()).get("calibration_tokens", 4096)
    # the same stdlib text the bundle ranked neurons on, after its first `skip` tokens: held out from it
    ids = calibration_text(skip + args.tokens + args.eval_tokens, tokenizer)[skip:]
    train_ids, eval_ids = ids[: args.tokens], ids[args.tokens:]
    xs, acts = collect(model, train_ids)
    ex, eacts = collect(model, eval_ids)
    neurons = load_file(args.bundle / "neurons.safetensors")
    tensors, recalls, preds = {}, [], []
    for li in range(len(xs)):
        order = neurons[f"layer.{li}.order"].long()
        y, ey = labels(acts[li][:, order], args.density), labels(eacts[li][:, order], args.density)
        a, b = train_layer(xs[li], y, args.rank, args.steps, seed=li)
        tensors[f"layer.{li}.a"], tensors[f"layer.{li}.b"] = a.contiguous(), b.contiguous()
        recalls.append(round(recall(ex[li], ey, a, b), 3))
        preds.append((a, b, order))
        print(f"\rpredictor {li + 1}/{len(xs)}: held-out recall {recalls[-1]:.3f}, {time.perf_counter() - start:.0f} s",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    del xs, acts
    save_file(tensors, args.bundle / "predictors.safetensors")
    with torch.inference_mode():
        dense = model(eval_ids.unsqueeze(0)).logits[0].argmax(-1)
    curve = []
    for density in args.curve:
        row = {"density": density, "oracle_magnitude": round(agreement(model, eval_ids, dense, density), 4),
               "predictor": round(agreement(model, eval_ids, dense, density, preds), 4),
               "hot_set": round(agreement(model, eval_ids, dense, density, "hot", [p[2] for p in preds]), 4)}
        curve.append(row)
        print(f"density {density}: agreement oracle {row['oracle_magnitude']}, predictor {row['predictor']}, "
              f"hot set {row['hot_set']}",
              file=sys.stderr, flush=True)
    report = {"rank": args.rank, "density": args.density, "train_tokens": args.tokens, "eval_tokens": args.eval_tokens,
              "held_out_recall_per_layer": recalls, "mean_recall": round(sum(recalls) / len(recalls), 3),
              "curve": curve, "seconds": round(time.perf_counter() - start, 1)}
    (args.bundle / "predictors.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
