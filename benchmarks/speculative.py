"""Speculative vs target-only decoding on real models, in one run, plus Hugging Face's own generate.

Runs the shipped prompts (code edits, code completion, summarising, question answering) one at a time
(batch 1, the latency setting HF assisted generation supports), greedy, and prints a table; --json
prints one JSON object instead.

    python -m benchmarks.speculative --config configs/default.yaml --k 3
    python -m benchmarks.speculative --config configs/bench_model_draft.yaml --k 3 --json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.exactness import check_outputs
from cluster.config import load_config
from cluster.engine import SpecEngine
from cluster.models.loader import load_model
from cluster.sampling.theory import expected_speedup, expected_tokens_per_pass
from cluster.types import SamplingParams

PROMPTS = Path(__file__).with_name("prompts.jsonl")


def load_prompts(tokenizer, raw: bool) -> list[str]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    if raw or not tokenizer.chat_template:
        return [r["prompt"] for r in rows]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                      add_generation_prompt=True)
        for r in rows
    ]


def run_engine(engine: SpecEngine, prompts: list[str], max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens)
    outputs, start = [], time.perf_counter()
    for prompt in prompts:
        outputs += engine.generate([prompt], params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"outputs": [o.token_ids for o in outputs], "seconds": seconds, "tokens": tokens}


def run_hf(model, tokenizer, prompts: list[str], max_tokens: int, **kwargs) -> dict:
    outputs, start = [], time.perf_counter()
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, **kwargs)
        outputs.append(out[0, enc.input_ids.shape[1]:].tolist())
    seconds = time.perf_counter() - start
    return {"outputs": outputs, "seconds": seconds, "tokens": sum(len(o) for o in outputs)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--k", type=int, default=None, help="a fixed draft length (default: the config's policy, "
                        "the cost model when speculation.adaptive is on)")
    parser.add_argument("--dtype", default=None, help="target and draft dtype (default: the config's; auto is "
                        "bf16 where the hardware has it)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate rows")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    config = load_config(args.config)
    spec_cfg = config.speculation
    if args.k is not None:
        spec_cfg.k, spec_cfg.adaptive = args.k, False
    spec_cfg.k_max = max(spec_cfg.k_max, spec_cfg.k)
    if args.dtype:
        config.target.dtype = args.dtype
        if hasattr(config.drafter.section, "dtype"):
            config.drafter.section.dtype = args.dtype
    spec = SpecEngine(config)
    base_config = dataclasses.replace(config, speculation=dataclasses.replace(spec_cfg, k=0))
    base = SpecEngine(base_config, model=spec.target.backend.model, tokenizer=spec.tokenizer)
    prompts = load_prompts(spec.tokenizer, args.raw)[: args.limit]

    for engine in (base, spec):  # warm-up: first calls allocate caches and pick kernels
        engine.generate([prompts[0]], SamplingParams(max_tokens=8))
    spec.stats = type(spec.stats)()
    spec.timings = type(spec.timings)()
    base.timings = type(base.timings)()

    b = run_engine(base, prompts, args.max_tokens)
    s = run_engine(spec, prompts, args.max_tokens)

    target_step_s = base.timings.verify_s / base.timings.steps  # one target pass over one token
    steps, drafted, accepted = spec.stats.steps, spec.stats.drafted, spec.stats.accepted
    a = accepted / drafted if drafted else 0.0
    k_mean = drafted / steps
    c = (spec.timings.draft_s / drafted) / target_step_s if drafted else 0.0
    verify_cost = (spec.timings.verify_s / steps) / target_step_s
    tps_base, tps_spec = b["tokens"] / b["seconds"], s["tokens"] / s["seconds"]
    speedup = tps_spec / tps_base
    theory = expected_speedup(a, k_mean, c)
    theory_v = expected_speedup(a, k_mean, c, verify_cost)
    result = {
        "target": Path(config.target.path).name,
        "drafter": config.drafter.kind if config.drafter.kind != "model" else Path(config.drafter.section.path).name,
        "dtype": str(spec.target.backend.dtype).removeprefix("torch."),
        "backend": spec.target.backend.name,
        "k": spec_cfg.k,
        "adaptive": spec_cfg.adaptive,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "tokens_per_s_baseline": round(tps_base, 2),
        "tokens_per_s_speculative": round(tps_spec, 2),
        "speedup": round(speedup, 3),
        "acceptance_rate": round(a, 3),
        "mean_accepted_length": round((s["tokens"] - len(prompts)) / steps, 3),  # tokens per verify pass
        "mean_draft_length": round(k_mean, 3),
        "expected_tokens_per_pass": round(expected_tokens_per_pass(a, k_mean), 3),
        "cost_ratio_c": round(c, 4),
        "verify_cost_ratio": round(verify_cost, 3),  # (K+1)-token pass / 1-token pass, measured
        "theoretical_speedup": round(theory, 3),  # DESIGN.md s.1: verify pass costs one step
        "efficiency": round(speedup / theory, 3) if theory else 0.0,
        "theoretical_speedup_measured_verify": round(theory_v, 3),
        "efficiency_vs_measured_verify": round(speedup / theory_v, 3) if theory_v else 0.0,
        "greedy_exact": s["outputs"] == b["outputs"],
    }
    # In a reduced dtype, exact means: every emitted token is the target's argmax in a dense teacher-forced
    # pass, except at near-ties (benchmarks/exactness.py). Counted over the speculative outputs.
    check = check_outputs(spec.target.backend.model, [spec.build(p).tokens for p in prompts], s["outputs"])
    result["teacher_forced"] = {k: check[k] for k in ("positions", "near_ties", "mismatches")}
    result["near_tie_rate"], result["exact"] = check["near_tie_rate"], check["exact"]
    if not args.no_hf:
        model, tok = spec.target.backend.model, spec.tokenizer
        gen_cfg = model.generation_config
        gen_cfg.pad_token_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else tok.eos_token_id
        if config.drafter.kind == "model":
            assisted = {"assistant_model": spec.drafter.drafter.backend.model}
        else:
            assisted = {"prompt_lookup_num_tokens": max(spec_cfg.k, 3)}
        run_hf(model, tok, prompts[:1], 8)  # warm-up
        run_hf(model, tok, prompts[:1], 8, **assisted)
        for name, kwargs in (("hf_plain", {}), ("hf_assisted", assisted)):
            h = run_hf(model, tok, prompts, args.max_tokens, **kwargs)
            tps = h["tokens"] / h["seconds"]
            result[name] = {
                "method": "generate(" + ", ".join(f"{k}=..." if k == "assistant_model" else f"{k}={v}"
                                                  for k, v in kwargs.items()) + ")",
                "tokens_per_s": round(tps, 2),
                "speedup_vs_our_baseline": round(tps / tps_base, 3),
                "greedy_exact": h["outputs"] == b["outputs"],
            }
        result["speedup_vs_hf_assisted"] = round(tps_spec / result["hf_assisted"]["tokens_per_s"], 3)
        # Plain HF generate in fp32 (what users run today) and in bf16, same prompts, same run.
        for dtype in ("float32", "bfloat16"):
            cfg = copy.deepcopy(config.target)
            cfg.dtype = dtype
            other = load_model(cfg)
            other.generation_config.pad_token_id = gen_cfg.pad_token_id
            run_hf(other, tok, prompts[:1], 8)
            h = run_hf(other, tok, prompts, args.max_tokens)
            result[f"hf_plain_{'fp32' if dtype == 'float32' else 'bf16'}"] = {
                "tokens_per_s": round(h["tokens"] / h["seconds"], 2),
                "speedup_of_speculative": round(tps_spec / (h["tokens"] / h["seconds"]), 3)}
            del other
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return result


def print_table(r: dict) -> None:
    print(f"target={r['target']} drafter={r['drafter']} k={r['k']} adaptive={r['adaptive']} "
          f"prompts={r['prompts']} max_tokens={r['max_tokens']} (batch 1, greedy)")
    rows = [("target-only (this engine)", r["tokens_per_s_baseline"], 1.0, "yes"),
            ("speculative (this engine)", r["tokens_per_s_speculative"], r["speedup"],
             "yes" if r["greedy_exact"] else "NO")]
    for name in ("hf_plain", "hf_assisted"):
        if name in r:
            h = r[name]
            rows.append((f"HF {h['method']}", h["tokens_per_s"], h["speedup_vs_our_baseline"],
                         "yes" if h["greedy_exact"] else "no"))
    print(f"{'method':<48} {'tok/s':>8} {'vs target-only':>15} {'same tokens':>12}")
    for name, tps, sp, exact in rows:
        print(f"{name:<48} {tps:>8.2f} {sp:>14.2f}x {exact:>12}")
    print()
    for key in ("acceptance_rate", "mean_accepted_length", "mean_draft_length", "cost_ratio_c", "verify_cost_ratio",
                "theoretical_speedup", "efficiency", "theoretical_speedup_measured_verify",
                "efficiency_vs_measured_verify", "speedup_vs_hf_assisted"):
        if key in r:
            print(f"{key:<38} {r[key]}")


if __name__ == "__main__":
    main()
