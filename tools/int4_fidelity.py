"""How closely a model with its FFN cast to int4 (cluster/models/int4.py) follows the model itself: the
dense model's greedy continuations of W-code prompts (the offload benchmark's), then the fraction of their
positions where the int4 model's argmax (teacher-forced) is the dense model's token, and the tokens a
K-token chain draft would yield per pass at that agreement pattern.

    python -m tools.int4_fidelity [--model models/qwen2.5-coder-1.5b-instruct] [--groups 32 128]
        [--prompts 6] [--tokens 48] [--k 12] [--json]

The first row, "bf16 (itself)", is the dense model against its own generate(): below 1.0 only by bf16
near-ties between the two computations' shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def chain_tokens_per_pass(hits: list[bool], k: int) -> float:
    """Tokens a pass for a chain draft of up to k tokens over this run of per-position agreements: each
    pass accepts the leading agreements (at most k) and adds the target's own next token."""
    i = passes = 0
    while i < len(hits):
        j = 0
        while j < k and i + j < len(hits) and hits[i + j]:
            j += 1
        passes += 1
        i += j + 1
    return len(hits) / max(passes, 1)


def main(argv=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.report import emit
    from benchmarks.offload import code_prompts
    from cluster.models.int4 import quantize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, local_files_only=True).eval()
    prompts = code_prompts(args.prompts)
    runs = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = tok(prompt, return_tensors="pt").input_ids
            runs.append((ids.shape[1], model.generate(ids, max_new_tokens=args.tokens, do_sample=False)))
            print(f"greedy continuations {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)

        def measure(label: str) -> dict:
            hits = [(model(seq).logits[0, n - 1:-1].argmax(-1) == seq[0, n:]).tolist() for n, seq in runs]
            flat = [h for run in hits for h in run]
            row = {"ffn": label, "agreement": round(sum(flat) / len(flat), 3),
                   "chain_tokens_per_pass": round(sum(chain_tokens_per_pass(h, args.k) for h in hits) / len(hits), 2)}
            print(f"{label}: {row}", file=sys.stderr, flush=True)
            return row

        table = [measure("bf16 (itself)")]
        ffn = [lin for name, m in model.named_modules() if name.endswith(".mlp")
               for lin in (m.gate_proj, m.up_proj, m.down_proj)]
        dense = [lin.weight.data for lin in ffn]
        for group in args.groups:
            for lin, w in zip(ffn, dense):
                lin.weight.data = quantize(w, group).dequantize()
            table.append(measure(f"int4, group {group}"))
        for lin, w in zip(ffn, dense):
            lin.weight.data = w
    result = {"model": Path(args.model).name, "prompts": len(prompts), "tokens": args.tokens, "k": args.k,
              "rows": table}
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
