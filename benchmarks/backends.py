"""Model backends against each other and against the memory roofline, in one run.

Per (backend, dtype): ms per pass for new tokens in {1, 4, 16, 64} and rows in {1, 8} over a 256-token
context, interleaved round by round (this machine's speed drifts, so no backend gets only slow minutes),
median of the rounds. The roofline is the weights' bytes over the read bandwidth measured in the same
run: probed at the start, between the parts and at the end, the median kept (this machine's bandwidth
probe ranged 31-55 GB/s across minutes; one probe made the roofline a coin toss). Then target-only
single-stream decoding through the engine (fast backend) against Hugging Face `generate` in the same dtype.

    python -m benchmarks.backends [--config configs/default.yaml] [--json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.report import emit
from benchmarks.speculative import load_prompts
from cluster.config import load_config
from cluster.engine import SpecEngine
from cluster.models.backend import HFBackend, Row
from cluster.models.lean import LeanBackend
from cluster.models.loader import load_model
from cluster.types import SamplingParams

CONTEXT = 256


def lean_plans() -> dict:
    from cluster.models import lean

    return dict(lean._PLAN)


def read_bandwidth_gb_s(megabytes: int = 512) -> float:
    """Bytes per second of a streaming read (a sum over a tensor far larger than the caches)."""
    a = torch.ones(megabytes * 2**20 // 4)
    a.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - start)
    return a.numel() * 4 / statistics.median(times) / 1e9


def time_pass(backend, slots: list[int], new_tokens: int) -> float:
    for s in slots:
        backend.cache.truncate(s, 0)
        backend.cache.reserve(s, CONTEXT)
        backend.cache.lengths[s] = CONTEXT
    sync = torch.cuda.synchronize if str(backend.device).startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    backend.forward([Row(s, [5] * new_tokens) for s in slots])
    sync()  # a GPU pass has only been queued when forward returns
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = load_config(args.config)
    probes = [read_bandwidth_gb_s()]
    rows, weights = [], {}
    for dtype in ("float32", "bfloat16"):
        cfg = copy.deepcopy(config.target)
        cfg.dtype = dtype
        backends = {"hf-eager": HFBackend(load_model(cfg), 8, 1024), "lean": LeanBackend(load_model(cfg), 8, 1024)}
        model = backends["lean"].model
        weights[dtype] = sum(p.numel() * p.element_size() for p in model.parameters())
        slots = {name: [b.cache.allocate() for _ in range(8)] for name, b in backends.items()}
        for n_rows in (1, 8):
            for new_tokens in (1, 4, 16, 64):
                samples = {name: [] for name in backends}
                for _ in range(args.rounds):
                    for name, b in backends.items():
                        samples[name].append(time_pass(b, slots[name][:n_rows], new_tokens))
                for name in backends:
                    rows.append({"backend": name, "dtype": dtype, "device": "cpu", "new_tokens": new_tokens,
                                 "batch_rows": n_rows, "ms": round(1000 * statistics.median(samples[name][1:]), 2)})
        del backends
        probes.append(read_bandwidth_gb_s())

    # Target-only decoding, single stream: the engine (fast backend, bf16) and HF generate (bf16, fp32).
    decode = {}
    base = copy.deepcopy(config)
    base.speculation.k = 0
    base.target.dtype, base.target.backend = "bfloat16", "auto"
    engine = SpecEngine(base)
    prompts = load_prompts(engine.tokenizer, raw=False)
    params = SamplingParams(max_tokens=args.decode_tokens)
    engine.generate([prompts[0]], SamplingParams(max_tokens=4))
    start, tokens, after_first, decode_s = time.perf_counter(), 0, 0, 0.0
    for p in prompts:  # streamed, so the time after each prompt's first token (its prefill) is known too
        first = None
        for delta in engine.stream(p, params):
            now = time.perf_counter()
            if first is None and delta.token_ids:
                first = now
            elif first is not None:
                after_first += len(delta.token_ids)
            tokens += len(delta.token_ids)
        decode_s += now - first
    decode["engine_bf16"] = tokens / (time.perf_counter() - start)
    probes.append(read_bandwidth_gb_s())
    for dtype in ("bfloat16", "float32"):
        cfg = copy.deepcopy(config.target)
        cfg.dtype = dtype
        model = load_model(cfg)
        tok = engine.tokenizer
        start, tokens = time.perf_counter(), 0
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=args.decode_tokens, do_sample=False, min_new_tokens=0)
            tokens += out.shape[1] - ids.shape[1]
        decode[f"hf_{dtype}"] = tokens / (time.perf_counter() - start)
    probes.append(read_bandwidth_gb_s())
    bandwidth = statistics.median(probes)
    roofline = {d: 1000 * w / (bandwidth * 1e9) for d, w in weights.items()}
    for row in rows:
        row["x_roofline"] = round(row["ms"] / roofline[row["dtype"]], 2)
    result = {
        "target": config.target.path.rsplit("/", 1)[-1],
        "read_bandwidth_gb_s": round(bandwidth, 2),
        "read_bandwidth_probes_gb_s": [round(b, 2) for b in probes],
        "weight_bytes": weights,
        "roofline_ms_per_token": round(roofline["bfloat16"], 2),
        "roofline_ms_per_token_fp32": round(roofline["float32"], 2),
        "decode_tokens_per_s": round(decode["engine_bf16"], 2),
        "decode_ms_per_token": round(1000 / decode["engine_bf16"], 2),
        "decode_x_roofline": round(1000 / decode["engine_bf16"] / roofline["bfloat16"], 2),
        # per token after the first (the prefill and the first token's pass left out): the decode step itself
        "decode_tpot_ms": round(1000 * decode_s / after_first, 2),
        "tpot_x_roofline": round(1000 * decode_s / after_first / roofline["bfloat16"], 2),
        "hf_generate_tokens_per_s": round(decode["hf_bfloat16"], 2),
        "hf_generate_fp32_tokens_per_s": round(decode["hf_float32"], 2),
        "decode_vs_hf_generate": round(decode["engine_bf16"] / decode["hf_bfloat16"], 3),
        # the kernel the lean backend timed fastest per dtype for one token and for a few (tune_products)
        "products": {str(dtype).removeprefix("torch."): plan for (dtype, _), plan in lean_plans().items()},
        "rows": rows,
    }
    emit(result, args.json, ["backend", "dtype", "device", "batch_rows", "new_tokens", "ms", "x_roofline"])
    return result


if __name__ == "__main__":
    main()
