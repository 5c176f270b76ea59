"""Every drafter on every workload (benchmarks/workloads/), against target-only decoding and Hugging Face's
prompt lookup and assisted generation, in one run; single stream, greedy, this engine's default backend.

    python -m benchmarks.drafters [--config configs/default.yaml] [--prompts 8] [--max-tokens 64] [--json]

Per drafter x workload: tokens per target pass, per-position acceptance, drafter microseconds per step,
tokens/s, speed-up over K = 0, exact (greedy output equal to target-only). The drafters (K = 0 among them)
take the prompts in turn, prompt by prompt, so none of them gets only this machine's slow minutes. HF
assisted generation uses the same compressed copy the layerskip drafter runs (the target's first layers
and head, as an HF model).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchmarks.report import emit
from benchmarks.exactness import check_outputs
from benchmarks.speculative import run_hf
from cluster.config import DrafterConfig, load_config
from cluster.drafters.configs import (
    HeadsConfig,
    LayerSkipConfig,
    MultiConfig,
    NgramConfig,
    QuantizedConfig,
    SuffixConfig,
)
from cluster.engine import SpecEngine
from cluster.types import SamplingParams

WORKLOADS = Path(__file__).with_name("workloads")


def drafters(layers: int, heads: str | None, multi_heads: str | None = None,
             heads_vocab: int = 0) -> dict[str, DrafterConfig | None]:
    """Every kind; multi merges the cheap searches and, where trained, heads (the model-based copies cost
    too much per call on this CPU to ride along). The heads row runs `heads` (trained on code); multi runs
    `multi_heads` (trained on code and chat, for traffic that mixes them) as a fallback member."""
    out = {
        "k0": None,
        "ngram": DrafterConfig("ngram", {"ngram": NgramConfig()}),
        "suffix": DrafterConfig("suffix", {"suffix": SuffixConfig()}),
        "layerskip": DrafterConfig("layerskip", {"layerskip": LayerSkipConfig(layers)}),
        "quantized": DrafterConfig("quantized", {"quantized": QuantizedConfig()}),
        "quantized_int4": DrafterConfig("quantized", {"quantized": QuantizedConfig("int4")}),
        # fp8 is a GPU format: here an emulation with the same numbers (its acceptance holds, its speed does not)
        "quantized_fp8": DrafterConfig("quantized", {"quantized": QuantizedConfig("fp8")}),
    }
    if heads:
        out["heads"] = DrafterConfig("heads", {"heads": HeadsConfig(heads, vocab=heads_vocab)})
    multi_heads = multi_heads or heads
    # The heads cost ~6 ms a call here (a pass: 25-35 ms): asked only where the searches found little.
    members = ["ngram", "suffix"] + (["heads"] if multi_heads else [])
    sections = {"multi": MultiConfig(members, fallback=["heads"] if multi_heads else [])} | \
        ({"heads": HeadsConfig(multi_heads, vocab=heads_vocab)} if multi_heads else {})
    out["multi"] = DrafterConfig("multi", sections)
    return out


def prompts_of(workload: str, tokenizer, count: int) -> list[str]:
    if workload == "mixed":  # W-edit and W-chat interleaved: one stream, two kinds of request
        edit, chat = prompts_of("edit", tokenizer, (count + 1) // 2), prompts_of("chat", tokenizer, count // 2)
        return [p for pair in zip(edit, chat + [None]) for p in pair if p is not None][:count]
    rows = [json.loads(line) for line in (WORKLOADS / f"{workload}.jsonl").read_text().splitlines()]
    step = max(1, len(rows) // count) if workload != "agent" else 1  # the agent session runs in order
    chosen = [r["prompt"] for r in rows[::step][:count]]
    if workload in ("edit", "chat") and tokenizer.chat_template:
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in chosen]
    return chosen


def run(engine: SpecEngine, prompts: list[str], max_tokens: int) -> dict:
    return run_interleaved({"one": engine}, prompts, max_tokens)["one"]


def run_interleaved(engines: dict[str, SpecEngine], prompts: list[str], max_tokens: int) -> dict[str, dict]:
    """Every engine over the prompts, prompt by prompt in turn (the order rotated each prompt), each timed
    alone: this machine's speed drifts by tens of percent over minutes, and engines run one after another
    compared the minutes they ran in as much as themselves."""
    records = {name: [] for name in engines}
    outputs = {name: [] for name in engines}
    seconds = dict.fromkeys(engines, 0.0)
    draft_s = {name: e.timings.draft_s for name, e in engines.items()}
    for name, engine in engines.items():
        apply = engine._apply

        def recording(seq, drafted, verdict, tokens, apply=apply, record=records[name]):
            record.append((drafted, verdict.accepted))
            return apply(seq, drafted, verdict, tokens)

        engine._apply = recording
    names = list(engines)
    try:
        for i, p in enumerate(prompts):
            for name in names[i % len(names):] + names[: i % len(names)]:
                start = time.perf_counter()
                outputs[name].append(engines[name].generate([p], SamplingParams(max_tokens=max_tokens))[0].token_ids)
                seconds[name] += time.perf_counter() - start
    finally:
        for engine in engines.values():
            del engine._apply
    return {name: _summary(records[name], outputs[name], seconds[name], engines[name].timings.draft_s - draft_s[name],
                           len(prompts)) for name in engines}


def _summary(record: list[tuple[int, int]], outputs: list[list[int]], seconds: float, draft_s: float,
             prompts: int) -> dict:
    tokens = sum(len(o) for o in outputs)
    passes = len(record)
    per_position = []
    for j in range(8):
        tried = sum(1 for d, _ in record if d > j)
        per_position.append(round(sum(1 for d, a in record if d > j and a > j) / tried, 3) if tried else None)
    drafting_steps = sum(1 for d, _ in record if d)
    # Per-token acceptance a (the i.i.d. model's maximum likelihood): accepted / (accepted + rejections).
    trials = sum(a + (1 if a < d else 0) for d, a in record if d)
    per_token = sum(a for d, a in record if d) / trials if trials else None
    return {"outputs": outputs, "per_token_acceptance": per_token, "tokens_per_s": tokens / seconds,
            "tokens_per_pass": (tokens - prompts) / max(passes, 1), "per_position_acceptance": per_position,
            "drafter_us_per_step": 1e6 * draft_s / max(drafting_steps, 1)}


def truncated_copy(model, layers: int):
    """The target's first layers and head as a standalone HF model (HF assisted generation's assistant)."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:layers]
    small.config.num_hidden_layers = layers
    return small


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--workloads", nargs="+", default=["edit", "agent", "chat", "code", "mixed"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8, help="layers of the layer-skip draft")
    parser.add_argument("--heads", default=None, help="trained heads (tools/train_heads.py; default: "
                        "models/<target>-heads when it exists)")
    parser.add_argument("--multi-heads", default=None, help="the heads multi merges (default: "
                        "models/<target>-heads-chat when it exists, else --heads)")
    parser.add_argument("--heads-vocab", type=int, default=8192, help="heads propose only their first this many "
                        "tokens (drafter.heads.vocab; 0: all they were trained on)")
    parser.add_argument("--drafters", nargs="+", default=None, help="only these (k0 always runs)")
    parser.add_argument("--fixed-k", type=int, default=4, help="the model-based copies also run at this fixed K, "
                        "so their acceptance is measured even where the cost model would not draft")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = load_config(args.config)
    def trained(given, suffix):
        if given is not None:
            return given
        default = Path(config.target.path).with_name(Path(config.target.path).name + suffix)
        return str(default) if (default / "heads.safetensors").is_file() else None

    heads, multi_heads = trained(args.heads, "-heads"), trained(args.multi_heads, "-heads-chat")
    base_cfg = copy.deepcopy(config)
    base_cfg.speculation.k = 0
    base = SpecEngine(base_cfg)
    rows, peers = [], []
    for workload in args.workloads:
        prompts = prompts_of(workload, base.tokenizer, args.prompts)
        base.generate([prompts[0]], SamplingParams(max_tokens=4))  # warm
        prompt_ids = [base.build(p).tokens for p in prompts]
        engines, configs = {}, {}
        for name, drafter in drafters(args.layers, heads, multi_heads, args.heads_vocab).items():
            if args.drafters and name != "k0" and name not in args.drafters:
                continue
            if drafter is None:
                engines[name] = base
                continue
            cfg = copy.deepcopy(config)
            cfg.drafter = drafter
            cfg.validate(check_paths=False)
            engines[name], configs[name] = SpecEngine(cfg, tokenizer=base.tokenizer, target=base.target), cfg
        results = run_interleaved(engines, prompts, args.max_tokens)
        reference = results["k0"]
        for name, result in results.items():
            fixed = None
            # the drafter's own acceptance, drafting every step
            if name in ("layerskip", "heads") or name.startswith("quantized"):
                cfg = configs[name]
                cfg.speculation.k, cfg.speculation.adaptive = args.fixed_k, False
                engine = SpecEngine(cfg, tokenizer=base.tokenizer, target=base.target)
                fixed = run(engine, prompts[: max(2, len(prompts) // 2)], args.max_tokens)
            check = check_outputs(base.target.backend.model, prompt_ids, result["outputs"])
            rows.append({"drafter": name, "workload": workload, "tokens_per_pass": round(result["tokens_per_pass"], 3),
                         "per_position_acceptance": result["per_position_acceptance"],
                         "per_token_acceptance": None if result["per_token_acceptance"] is None
                         else round(result["per_token_acceptance"], 3),
                         "drafter_us_per_step": round(result["drafter_us_per_step"], 1),
                         "tokens_per_s": round(result["tokens_per_s"], 2),
                         "speedup": round(result["tokens_per_s"] / reference["tokens_per_s"], 3),
                         # target's argmax outside near-ties (teacher-forced); identical: equal to K = 0's tokens
                         "exact": check["exact"], "near_tie_rate": check["near_tie_rate"],
                         "identical_to_k0": result["outputs"] == reference["outputs"],
                         **({"acceptance_fixed_k": None if fixed["per_token_acceptance"] is None
                             else round(fixed["per_token_acceptance"], 3),
                             "tokens_per_pass_fixed_k": round(fixed["tokens_per_pass"], 3),
                             "tokens_per_s_fixed_k": round(fixed["tokens_per_s"], 2)} if fixed else {})})
            print(f"{workload} {name}: {rows[-1]['tokens_per_s']} tok/s", flush=True, file=__import__("sys").stderr)
        model, tok = base.target.backend.model, base.tokenizer
        model.generation_config.pad_token_id = tok.eos_token_id
        for method, kwargs in (("hf_prompt_lookup", {"prompt_lookup_num_tokens": 3}),
                               ("hf_assisted", {"assistant_model": truncated_copy(model, args.layers)})):
            h = run_hf(model, tok, prompts, args.max_tokens, **kwargs)
            peers.append({"workload": workload, "method": method, "tokens_per_s": round(h["tokens"] / h["seconds"], 2)})
    result = {"target": config.target.path.rsplit("/", 1)[-1], "dtype": str(base.target.backend.dtype),
              "prompts_per_workload": args.prompts, "max_tokens": args.max_tokens, "layerskip_layers": args.layers,
              "heads": heads, "multi_heads": multi_heads or heads, "heads_vocab": args.heads_vocab, "fixed_k": args.fixed_k,
              "rows": rows, "peers": peers}
    emit(result, args.json, ["workload", "drafter", "tokens_per_pass", "drafter_us_per_step", "tokens_per_s",
                             "speedup", "exact"])
    if not args.json:
        for p in peers:
            print(f"peer {p['workload']} {p['method']}: {p['tokens_per_s']} tok/s")
    return result


if __name__ == "__main__":
    main()
