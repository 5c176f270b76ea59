"""MEGABYTE against a byte-level Transformer trained the same way for the same time (tools/train_megabyte.py),
in one run: bits per byte on held-out stdlib files, and greedy generation speed on held-out code:

    baseline      the byte Transformer, its own KV-cached greedy loop
    megabyte      plain MEGABYTE, the same bare greedy loop over its cached backend (global model once per
                  patch): the like-for-like comparison with the baseline
    engine        plain MEGABYTE through this engine (K = 0): what the speculative row is measured against
    speculative   MEGABYTE with speculative patches in the engine (byte n-grams, 8 bytes a pass: configs/megabyte.yaml)
    tiers_1/8     MEGABYTE on two tiers on Ray (global model in a target actor on core 0, local model in a
                  draft actor on core 1), 1 and 8 concurrent streams; global_utilization is the target
                  actor's busy fraction at 8 streams

    python -m benchmarks.megabyte [--model models/megabyte-stdlib] [--baseline models/bytegpt-stdlib] [--json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import emit
from cluster.config import load_config
from cluster.engine import SpecEngine
from cluster.models.backend import Row
from cluster.models.loader import load_model
from cluster.types import SamplingParams, SpecStats
from tools.train_megabyte import bits_per_byte, corpus, windows


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def code_prompts(held_ids: np.ndarray, count: int, length: int) -> list[str]:
    """Prompts from held-out files: `length` bytes from the start of a line, whole UTF-8 characters."""
    data = bytes((held_ids[held_ids >= 3] - 3).astype(np.uint8).tolist())
    rng = np.random.default_rng(7)
    out = []
    while len(out) < count:
        start = data.find(b"\n    def ", int(rng.integers(0, len(data) - 4 * length)))
        if start < 0:
            continue
        out.append(data[start + 1: start + 1 + length].decode("utf-8", errors="ignore"))
    return out


@torch.inference_mode()
def cached_loop(backend, ids: list[int], max_new: int) -> list[int]:
    """Greedy decoding straight over the backend (no scheduler, no sampling rules): the baseline's harness."""
    slot = backend.cache.allocate()
    try:
        out, generated = backend.forward([Row(slot, ids)], last_only=True), []
        for _ in range(max_new):
            token = int(out.flat[0].argmax())
            generated.append(token)
            if token == backend.config.eos_token_id or len(ids) + len(generated) >= backend.cache.capacity:
                break
            out = backend.forward([Row(slot, [token])], last_only=True)
        return generated
    finally:
        backend.cache.free(slot)


def timed(generate, prompts: list[str]) -> tuple[list[list[int]], float]:
    start, outputs = time.perf_counter(), []
    for p in prompts:
        outputs.append(generate(p))
    return outputs, sum(len(o) for o in outputs) / (time.perf_counter() - start)


def tiers(config, prompts: list[str], max_bytes: int, streams: int, patch: int) -> tuple[float, float, list[list[int]]]:
    """(bytes/s, global-tier utilisation, outputs) of `streams` closed-loop streams on two pinned tiers."""
    import ray

    from cluster.router import Router

    cfg = copy.deepcopy(config)
    cfg.drafter.kind = "megabyte_local"
    cfg.drafter.sections = {}
    cfg.speculation.k = cfg.speculation.k_max = patch
    cfg.speculation.adaptive = False
    cfg.cluster.pipelining = "split" if streams > 1 else "off"
    cfg.cluster.target_pool.cpus, cfg.cluster.draft_pool.cpus = [0], [1]
    cfg.cluster.target_pool.num_cpus = cfg.cluster.draft_pool.num_cpus = 0
    cfg.limits.max_batch_size = max(cfg.limits.max_batch_size, streams)
    ray.init(num_cpus=2, resources={"target_node": 1, "draft_node": 1}, include_dashboard=False, log_to_driver=False)
    router = Router(cfg)
    try:
        router.wait_ready()
        router.generate(prompts[:1], SamplingParams(max_tokens=8))  # warm
        queue = [prompts[i % len(prompts)] for i in range(2 * streams)]
        busy = router.executor.target_busy_s()
        start = time.perf_counter()
        outputs = [o.token_ids for o in router.generate(queue, SamplingParams(max_tokens=max_bytes))]
        wall = time.perf_counter() - start
        utilization = (router.executor.target_busy_s() - busy) / wall
        return sum(len(o) for o in outputs) / wall, utilization, outputs
    finally:
        router.shutdown()
        ray.shutdown()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/megabyte.yaml")
    parser.add_argument("--baseline", default="models/bytegpt-stdlib")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-bytes", type=int, default=256)
    parser.add_argument("--max-bytes", type=int, default=256)
    parser.add_argument("--no-tiers", action="store_true", help="skip the Ray two-tier rows")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = load_config(args.config)
    _, held_ids, _ = corpus()
    held = windows(held_ids, 64, 1024, np.random.default_rng(12345))  # the training script's held-out windows
    prompts = code_prompts(held_ids, args.prompts, args.prompt_bytes)
    params = SamplingParams(max_tokens=args.max_bytes)

    log("bits per byte (held out)")
    baseline = load_model(dataclasses.replace(config.target, path=str(Path(args.baseline).resolve())))
    plain_cfg = copy.deepcopy(config)
    plain_cfg.speculation.k = 0
    plain = SpecEngine(plain_cfg)
    megabyte = plain.target.backend.model
    bpb = {"megabyte": bits_per_byte(megabyte, held, 16), "baseline": bits_per_byte(baseline, held, 16)}

    log("generation")
    tok = plain.tokenizer
    spec = SpecEngine(config, tokenizer=tok, target=plain.target)
    warm = SamplingParams(max_tokens=16)  # first passes (and the cost model's calibration) stay out of the timings
    backend = plain.target.backend
    baseline.generate_cached(tok.encode(prompts[0]), 16), cached_loop(backend, tok.encode(prompts[0]), 16)
    plain.generate(prompts[:1], warm), spec.generate(prompts[:1], warm)
    spec.stats = SpecStats()
    base_out, base_bps = timed(lambda p: baseline.generate_cached(tok.encode(p), args.max_bytes), prompts)
    loop_out, loop_bps = timed(lambda p: cached_loop(backend, tok.encode(p), args.max_bytes), prompts)
    plain_out, plain_bps = timed(lambda p: plain.generate([p], params)[0].token_ids, prompts)
    spec_out, spec_bps = timed(lambda p: spec.generate([p], params)[0].token_ids, prompts)
    recompute = megabyte.generate_recompute(tok.encode(prompts[0]), 64)
    loop_out = [o[:-1] if o and o[-1] == backend.config.eos_token_id else o for o in loop_out]  # the engine drops EOS
    exact = spec_out == plain_out == loop_out and plain_out[0][:64] == recompute[: len(plain_out[0][:64])]
    result = {
        "model": config.target.path.rsplit("/", 1)[-1], "baseline": Path(args.baseline).name,
        "patch_size": megabyte.config.patch_size,
        "parameters_megabyte": sum(p.numel() for p in megabyte.parameters()),
        "parameters_baseline": sum(p.numel() for p in baseline.parameters()),
        "bpb_megabyte": round(bpb["megabyte"], 4), "bpb_baseline": round(bpb["baseline"], 4),
        "bytes_per_s_baseline": round(base_bps, 1), "bytes_per_s_megabyte": round(loop_bps, 1),
        "bytes_per_s_engine": round(plain_bps, 1),
        "bytes_per_s_speculative": round(spec_bps, 1),
        "speculative_bytes_per_pass": round((sum(len(o) for o in spec_out) - len(prompts)) / max(spec.stats.steps, 1), 3),
        "speculative_acceptance": round(spec.stats.acceptance_rate, 3),
        "exact": exact,
    }
    if not args.no_tiers:
        patch = megabyte.config.patch_size
        log("two tiers, 1 stream")
        result["bytes_per_s_tiers_1"], _, one = tiers(config, prompts, args.max_bytes, 1, patch)
        log("two tiers, 8 streams")
        result["bytes_per_s_tiers_8"], result["global_utilization"], eight = tiers(config, prompts, args.max_bytes, 8,
                                                                                  patch)
        result["bytes_per_s_tiers_8"] = round(result["bytes_per_s_tiers_8"], 1)
        result["bytes_per_s_tiers_1"] = round(result["bytes_per_s_tiers_1"], 1)
        result["global_utilization"] = round(result["global_utilization"], 3)
        expected = [plain_out[i % len(prompts)] for i in range(len(eight))]
        result["tiers_exact"] = eight == expected and one == expected[: len(one)]
        result["exact"] = result["exact"] and result["tiers_exact"]
    result["rows"] = [{"method": m, "bytes_per_s": result.get(f"bytes_per_s_{m}")} for m in
                      ("baseline", "megabyte", "engine", "speculative", "tiers_1", "tiers_8") if f"bytes_per_s_{m}" in result]
    emit(result, args.json, ["method", "bytes_per_s"])
    return result


if __name__ == "__main__":
    main()
