"""A target larger than its DRAM budget, streamed from storage ("LLM in a flash"), with and without
speculation, in one run; single stream, greedy, code completions (benchmarks/workloads/code.jsonl).

    python -m benchmarks.offload [--bundle models/qwen2.5-coder-1.5b-flash] [--budget-fraction 0.5]
        [--prompts 20] [--max-tokens 64] [--k 20] [--confidence 0.1] [--k-others 12] [--json]

Modes, each in its own process (so each one's peak RSS is its own):
  naive         every layer's FFN read from storage for every pass, then computed (no cache, no prefetch)
  offload       the offloaded backend without speculation: hot neurons cached, the rest read one layer ahead
  offload_spec  the same with its own int4 self-draft (resident attention and head, the FFN an int4 copy cast
                at load time; its bytes come out of the same budget, so the cache shrinks), K tokens a pass
  offload_spec_hot  the same with the sparse hot-neuron draft (the FFN over the cached neurons only, bf16)
  offload_small_draft  the same target with Qwen2.5-Coder-0.5B as the draft, inside the same budget
  offload_spec_own_prefill  offload_spec with each prompt read in a weight pass of its own (not by default)
  offload_spec_serial  offload_spec drafting only between passes, never beside one (not by default)
  offload_sparse  APPROXIMATE, the paper's own inference without speculation (not by default): each FFN runs
                over the neurons its trained predictor calls active (--sparse-densities, one run each), and
                only those the hot set lacks are read. Its `agreement` (the share of its tokens that are the
                dense model's argmax, teacher-forced) says what that costs; it is left out of `exact`.
  dense         the in-memory model (no budget): the reference every mode's output is checked against
The speculative modes defer each prefill into the request's first verify pass (speculation.defer_prefill:
the prompt and the first draft share one weight pass); --no-defer-prefill turns that off for all of them.
They draft beside the verify (cluster.pipelining continue: while the target streams its weights, a thread
drafts on from the proposal under verification; it is used when all of it is accepted and the guess of
the next token is right); --pipelining off drafts only between passes.
The two modes without speculation take seconds per token, so they time the first --slow-prompts prompts;
the others run all of them. --disk-mb-s (and --disk-latency-us) emulate a slower storage device under
every mode alike: each read takes latency + bytes / bandwidth on one queue (SlowDisk). The issue's disk,
756 MB/s in 16 MiB reads and 239 MB/s in 32 KiB reads, is --disk-mb-s 759 --disk-latency-us 94.
`exact`: every output is the dense model's greedy argmax at every position
(teacher-forced, bf16 near-ties counted, as in benchmarks/exactness.py), and the token streams are
compared with the dense model's own greedy outputs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = Path(__file__).with_name("workloads") / "code.jsonl"
MODES = ("naive", "offload", "offload_spec", "offload_spec_hot", "offload_small_draft")
EXTRA_MODES = ("offload_spec_own_prefill", "offload_spec_serial", "offload_sparse")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def code_prompts(count: int) -> list[str]:
    rows = [json.loads(line) for line in WORKLOAD.read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // count)
    return [r["prompt"] for r in rows[::step][:count]]


def weight_bytes(directory: Path) -> int:
    """Bytes of a bundle's weights: what the model is, however it is split."""
    return sum((directory / f).stat().st_size for f in ("resident.safetensors", "ffn.bin", "embed.bin")
               if (directory / f).is_file())


def bf16_copy(source: Path) -> Path:
    """The small draft in bf16 on disk (the fetched copy is fp32: loading it would touch twice the bytes)."""
    dest = source.with_name(source.name + "-bf16")
    if not (dest / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log(f"writing a bf16 copy of {source} to {dest}")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, local_files_only=True)
        model.save_pretrained(dest)
        AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(dest)
    return dest


def run_mode(args) -> dict:
    """One mode in this process: build the engine, generate, report."""
    import torch

    from cluster.config import DrafterConfig, EngineConfig, ModelConfig, SpeculationConfig
    from cluster.drafters.configs import ModelDrafterConfig, SparseConfig
    from cluster.engine import SpecEngine
    from cluster.models.flash_store import BundleLayout
    from cluster.types import SamplingParams

    torch.set_num_threads(2)
    mode, bundle = args.run_mode, Path(args.bundle)
    label = f"offload_sparse_{args.sparse_density:g}" if mode == "offload_sparse" else mode
    own_prefill, serial = mode == "offload_spec_own_prefill", mode == "offload_spec_serial"
    mode = "offload_spec" if own_prefill or serial else mode
    prompts = code_prompts(args.prompts)
    if mode in ("naive", "offload", "offload_sparse"):
        prompts = prompts[: args.slow_prompts]
    budget = args.budget_fraction * weight_bytes(bundle) / 1e9
    draft_gb = 0.0
    drafter = DrafterConfig("ngram")
    # The int4 self-draft agrees with the target ~0.95 a token and drafts long; the other two drafts keep
    # the settings tuned for them (--k-others, --confidence-others).
    k, confidence = (args.k, args.confidence) if mode == "offload_spec" else (args.k_others, args.confidence_others)
    if mode in ("offload_spec", "offload_spec_hot"):
        sparse = SparseConfig(confidence_threshold=confidence, ffn="hot" if mode == "offload_spec_hot" else "int4",
                              group=args.group)
        drafter = DrafterConfig("sparse", {"sparse": sparse})
    elif mode == "offload_small_draft":
        small = bf16_copy(Path(args.small_draft))
        draft_gb = sum(f.stat().st_size for f in small.glob("*.safetensors")) / 1e9
        drafter = DrafterConfig("model", {"model": ModelDrafterConfig(str(small), dtype="bfloat16",
                                                                      confidence_threshold=confidence)})
    else:
        k = 0
    if mode == "dense":
        target = ModelConfig(args.source, dtype="bfloat16")
    else:
        target = ModelConfig(str(bundle), dtype="bfloat16", backend="offload", memory_budget_gb=budget - draft_gb)
    adaptive = args.adaptive and k > 0  # the cost model chooses each pass's draft length, up to k_max
    defer = args.defer_prefill and k > 0 and not own_prefill
    config = EngineConfig(target=target, drafter=drafter, speculation=SpeculationConfig(
        k=k, k_max=max(args.k_max if adaptive else k, 1), adaptive=adaptive, defer_prefill=defer))
    config.cluster.pipelining = args.pipelining if k > 0 and not serial else "off"
    config.limits.max_batch_size = 1
    config.limits.max_model_len = 1024
    start = time.perf_counter()
    if mode == "offload_sparse":
        engine = _engine_with_backend(config, functools.partial(_approximate, args))
    elif mode in ("naive", "offload_small_draft"):
        engine = _engine_with_cache(config, 0 if mode == "naive" else None, prefetch=mode != "naive")
    else:
        engine = SpecEngine(config.validate())
    load_s = time.perf_counter() - start
    backend = engine.target.backend
    if args.disk_mb_s and mode != "dense":  # after loading: the emulated device times generation only
        from cluster.models.flash_store import SlowDisk

        backend.emulate_disk(SlowDisk(args.disk_mb_s, args.disk_latency_us))
    read0 = getattr(getattr(backend, "reader", None), "bytes_read", 0)
    outputs, passes, accepted, drafted = [], 0, 0, 0
    params = SamplingParams(max_tokens=args.max_tokens)
    t0 = {k: getattr(engine.timings, k) for k in ("prefill_s", "draft_s", "verify_s")}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        out = engine.generate([prompt], params)[0]
        outputs.append({"prompt_ids": engine.tokenizer.encode(prompt), "token_ids": out.token_ids})
        passes += out.stats.steps
        accepted += out.stats.accepted
        drafted += out.stats.drafted
        done = sum(len(o["token_ids"]) for o in outputs)
        log(f"  {label}: prompt {i + 1}/{len(prompts)}, {done} tokens, "
            f"{done / (time.perf_counter() - start):.2f} tok/s")
    seconds = time.perf_counter() - start
    tokens = sum(len(o["token_ids"]) for o in outputs)
    row = {"mode": label, "defer_prefill": defer, "pipelining": config.cluster.pipelining,
           "prompts": len(prompts), "tokens": tokens,
           "seconds": round(seconds, 2),
           "tokens_per_s": round(tokens / seconds, 3), "load_s": round(load_s, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
           "k": k, "verify_passes": passes, "drafted": drafted, "accepted": accepted,
           "tokens_per_pass": round(tokens / max(passes, 1), 2), "accepted_per_pass": round(accepted / max(passes, 1), 2),
           "acceptance": round(accepted / max(drafted, 1), 3),
           "continued_used": int(engine.metrics.value("specdec_continued_drafts_total", outcome="used")),
           "continued_dropped": int(engine.metrics.value("specdec_continued_drafts_total", outcome="dropped")),
           **{k.replace("_s", "_share"): round((getattr(engine.timings, k) - v) / seconds, 3) for k, v in t0.items()},
           "outputs": outputs}
    if mode != "dense":
        from cluster.models.flash_store import resident_fraction

        lay = BundleLayout.load(bundle)
        backend.settle()
        row["page_cache_fraction"] = round(resident_fraction(bundle / "ffn.bin"), 4)  # O_DIRECT: ~0
        read = backend.reader.bytes_read - read0 + (backend.embed_rows.bytes_read if backend.embed_rows else 0)
        row |= {"budget_gb": round(budget, 3), "held_gb": round((backend.held_bytes + draft_gb * 1e9) / 1e9, 3),
                "cached_neurons": f"{backend.neurons.capacity}/{lay.intermediate}",
                "bytes_read_per_token": int(read / max(tokens, 1)),
                "read_gb_per_s": round(read / 1e9 / max(seconds, 1e-9), 2),
                "io_wait_share": round(backend.io_wait_s / seconds, 3)}
        if backend.reader.disk is not None:
            row["disk_sleep_share"] = round(backend.reader.disk.waited_s / seconds, 3)
        if mode == "offload_sparse":  # the union over a pass's tokens: a prompt's pass keeps nearly all
            row |= {"sparse_density": args.sparse_density, "merge_bytes": backend.reader.merge_bytes,
                    "kept_density": round(backend.kept_neurons / max(backend.layer_passes * lay.intermediate, 1), 3)}
    return row


def _engine_with_cache(config, cache_neurons: int | None, prefetch: bool):
    """An engine whose offloaded target is built with explicit cache/prefetch settings (naive streaming:
    no cache, no read-ahead; a small draft: whatever budget is left, possibly none)."""
    from cluster.models.offload import OffloadedBackend

    def build(model, slots, capacity, cfg):
        try:
            return OffloadedBackend(model, slots, capacity, cfg.path, cfg.memory_budget_gb, prefetch=prefetch,
                                    cache_neurons=cache_neurons)
        except ValueError as err:  # the budget left after the draft holds no cache: stream all of the FFN
            log(f"  {err}; running with no neuron cache")
            return OffloadedBackend(model, slots, capacity, cfg.path, 1e6, prefetch=prefetch, cache_neurons=0)

    return _engine_with_backend(config, build)


def _approximate(args, model, slots, capacity, cfg):
    """The paper's approximate inference; reads merge through gaps up to the emulated device's latency x
    bandwidth (where another request costs as much as the bytes), or the reader's default on a real disk."""
    from cluster.models.approx_offload import ApproximateOffloadedBackend

    merge = int(args.disk_latency_us * 1e-6 * args.disk_mb_s * 1e6) if args.disk_mb_s else None
    return ApproximateOffloadedBackend(model, slots, capacity, cfg.path, cfg.memory_budget_gb,
                                       density=args.sparse_density, merge_bytes=merge)


def _engine_with_backend(config, build):
    """An engine whose target backend is `build(model, slots, capacity, target config)`."""
    from cluster.engine import SpecEngine
    from cluster.models.loader import load_model, load_tokenizer
    from cluster.workers.target_worker import TargetWorker

    limits, spec = config.validate().limits, config.speculation
    capacity = limits.max_model_len + spec.k_max + 1
    model = load_model(config.target)
    tokenizer = load_tokenizer(config.target)
    cfg = config.target
    backend = build(model, limits.max_batch_size, capacity, cfg)
    worker = TargetWorker(cfg, limits.max_batch_size, capacity, model=model, rule=spec.rule, backend=backend,
                          extra_eos=tuple({tokenizer.eos_token_id} - {None}))
    return SpecEngine(config, tokenizer=tokenizer, target=worker)


def check(args, rows: list[dict]) -> dict:
    """Teacher-forced exactness of every mode's outputs against the dense model (this process loads it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.exactness import check_outputs

    model = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.bfloat16, local_files_only=True).eval()
    dense = {tuple(o["prompt_ids"]): o["token_ids"] for r in rows if r["mode"] == "dense" for o in r["outputs"]}
    out = {}
    for r in rows:
        result = check_outputs(model, [o["prompt_ids"] for o in r["outputs"]], [o["token_ids"] for o in r["outputs"]])
        same = sum(dense.get(tuple(o["prompt_ids"])) == o["token_ids"] for o in r["outputs"])
        out[r["mode"]] = {**result, "identical_to_dense": f"{same}/{len(r['outputs'])}"}
    return out


def child(label: str, flags: list[str]) -> dict:
    """Run this script with `flags` in a fresh process (its own peak RSS) and return the JSON it writes."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    log(f"{label}: starting")
    subprocess.run([sys.executable, "-m", "benchmarks.offload", *flags, "--out", path], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(Path(path).read_text())
    os.unlink(path)
    return result


def spawn(args, mode: str, density: float = 0.0) -> dict:
    return child(mode, [
        "--run-mode", mode, "--sparse-density", str(density), "--bundle", args.bundle, "--source", args.source,
        "--small-draft", args.small_draft,
        "--budget-fraction", str(args.budget_fraction), "--prompts", str(args.prompts),
        "--slow-prompts", str(args.slow_prompts), "--max-tokens", str(args.max_tokens), "--k", str(args.k),
        "--confidence", str(args.confidence), "--k-others", str(args.k_others), "--confidence-others",
        str(args.confidence_others), "--group", str(args.group), "--k-max", str(args.k_max),
        "--disk-mb-s", str(args.disk_mb_s), "--disk-latency-us", str(args.disk_latency_us),
        *([] if args.defer_prefill else ["--no-defer-prefill"]), "--pipelining", args.pipelining,
        *(["--adaptive"] if args.adaptive else [])])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="models/qwen2.5-coder-1.5b-flash")
    parser.add_argument("--source", default="models/qwen2.5-coder-1.5b-instruct", help="the dense model (reference)")
    parser.add_argument("--small-draft", default="models/qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--budget-fraction", type=float, default=0.5, help="DRAM budget / model weight bytes")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--slow-prompts", type=int, default=2, help="prompts the modes without speculation time")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=20, help="the int4 self-draft's tokens per pass at most")
    parser.add_argument("--k-others", type=int, default=12, help="the hot-neuron and 0.5B drafts' tokens per pass")
    parser.add_argument("--adaptive", action="store_true", help="the cost model chooses K (up to --k-max)")
    parser.add_argument("--k-max", type=int, default=16)
    parser.add_argument("--confidence", type=float, default=0.1,
                        help="the int4 self-draft stops after a token it gives less than this (exact either way)")
    parser.add_argument("--confidence-others", type=float, default=0.4, help="the same for the other two drafts")
    parser.add_argument("--group", type=int, default=32, help="the int4 self-draft's quantization group")
    parser.add_argument("--disk-mb-s", type=float, default=0.0,
                        help="emulate a storage device of this bandwidth (0: this machine's own disk, as is)")
    parser.add_argument("--disk-latency-us", type=float, default=0.0, help="the emulated device's time per request")
    parser.add_argument("--no-defer-prefill", dest="defer_prefill", action="store_false",
                        help="read each prompt in a weight pass of its own (speculation.defer_prefill off)")
    parser.add_argument("--pipelining", choices=("continue", "off"), default="continue",
                        help="the speculative modes draft beside the verify (continue) or only between passes")
    parser.add_argument("--sparse-densities", type=float, nargs="+", default=[0.1, 0.3, 0.5],
                        help="offload_sparse: the fractions of neurons kept per token, one run each")
    parser.add_argument("--sparse-density", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES + EXTRA_MODES)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save-outputs", help="write every mode's token ids here (JSON)")
    parser.add_argument("--run-mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--check-from", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_mode:  # a child: one mode
        Path(args.out).write_text(json.dumps(run_mode(args)))
        return {}
    if args.check_from:  # a child: the exactness check
        Path(args.out).write_text(json.dumps(check(args, json.loads(Path(args.check_from).read_text()))))
        return {}
    from cluster.models.flash_store import drop_from_page_cache

    bundle = Path(args.bundle)
    for name in ("ffn.bin", "embed.bin"):
        if (bundle / name).is_file():
            drop_from_page_cache(bundle / name)
    rows = [spawn(args, mode, density) for mode in ("dense", *args.modes)
            for density in (args.sparse_densities if mode == "offload_sparse" else [0.0])]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(rows, f)
    checks = child("check: teacher-forced against the dense model", ["--check-from", f.name, "--source", args.source])
    os.unlink(f.name)
    if args.save_outputs:
        Path(args.save_outputs).write_text(json.dumps(rows))
    by = {r["mode"]: r for r in rows}
    for r in rows:
        r |= {k: checks[r["mode"]][k] for k in ("positions", "near_ties", "mismatches", "mismatch_gaps",
                                                 "identical_to_dense")}
        r.pop("outputs")
    naive = by.get("naive", {}).get("tokens_per_s")
    spec = by.get("offload_spec", {})
    result = {
        "model": bundle.name, "model_gb": round(weight_bytes(bundle) / 1e9, 3),
        "budget_gb": round(args.budget_fraction * weight_bytes(bundle) / 1e9, 3),
        "peak_rss_gb": spec.get("peak_rss_gb"), "bytes_read_per_token": spec.get("bytes_read_per_token"),
        "accepted_per_pass": spec.get("accepted_per_pass"), "tokens_per_pass": spec.get("tokens_per_pass"),
        "tokens_per_s_dense_in_memory": by["dense"]["tokens_per_s"],
        "tokens_per_s_naive": naive, "tokens_per_s_offload": by.get("offload", {}).get("tokens_per_s"),
        "tokens_per_s_offload_spec": spec.get("tokens_per_s"),
        "tokens_per_s_offload_small_draft": by.get("offload_small_draft", {}).get("tokens_per_s"),
        "tokens_per_s_offload_spec_hot": by.get("offload_spec_hot", {}).get("tokens_per_s"),
        "accepted_per_pass_hot": by.get("offload_spec_hot", {}).get("accepted_per_pass"),
        "exact": all(checks[m]["mismatches"] == 0 for m in checks if not m.startswith("offload_sparse")),
        "k": args.k, "adaptive": args.adaptive, "confidence_threshold": args.confidence, "group": args.group,
        "k_others": args.k_others, "confidence_threshold_others": args.confidence_others,
        "defer_prefill": args.defer_prefill, "pipelining": args.pipelining,
        "disk": ({"emulated": True, "mb_s": args.disk_mb_s, "latency_us": args.disk_latency_us} if args.disk_mb_s
                 else {"emulated": False}),
        "rows": rows,
    }
    for extra in EXTRA_MODES:
        if extra in by:
            result[f"tokens_per_s_{extra}"] = by[extra]["tokens_per_s"]
    # the paper's approximate "offload alone", one entry per density: speed against naive, and what it costs
    result["offload_sparse"] = [
        {"density": r["sparse_density"], "kept_density": r["kept_density"], "tokens_per_s": r["tokens_per_s"],
         "speedup_over_naive": round(r["tokens_per_s"] / naive, 2) if naive else None,
         "agreement": round(1 - r["mismatches"] / max(r["positions"], 1), 4),
         "bytes_read_per_token": r["bytes_read_per_token"]}
        for r in rows if r["mode"].startswith("offload_sparse")]
    if result["offload_sparse"] and (bundle / "predictors.json").is_file():  # tools/train_predictors.py's curve
        result["predictor_curve"] = json.loads((bundle / "predictors.json").read_text())["curve"]
    for key in ("offload", "offload_spec", "offload_spec_hot", "offload_small_draft") + EXTRA_MODES:
        if naive and result.get(f"tokens_per_s_{key}"):
            result[f"speedup_{key}_over_naive"] = round(result[f"tokens_per_s_{key}"] / naive, 2)
    from benchmarks.report import emit

    cols = ["mode", "defer_prefill", "pipelining", "tokens", "tokens_per_s", "tokens_per_pass", "accepted_per_pass",
            "acceptance",
            "draft_share", "continued_used", "continued_dropped",
            "bytes_read_per_token", "read_gb_per_s", "io_wait_share", "disk_sleep_share", "held_gb", "budget_gb",
            "peak_rss_gb", "cached_neurons", "kept_density", "near_ties", "mismatches", "identical_to_dense"]
    if not args.json:
        result = {**result, "rows": [{c: r.get(c, "-") for c in cols} for r in rows]}
    emit(result, args.json, cols)
    return result


if __name__ == "__main__":
    main()
