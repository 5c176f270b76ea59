"""N concurrent streams through the Ray cluster: speculative (pipelined and not) vs the same cluster
with K = 0, in one run. Prints a table; --json prints one object with a row per concurrency.

    python -m benchmarks.cluster_load --config configs/default.yaml --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import ray

from cluster.config import load_config
from cluster.router import Router
from cluster.types import FinalDelta, SamplingParams
from benchmarks.speculative import load_prompts


def drive(router: Router, prompts: list[str], streams: int, per_stream: int, max_tokens: int) -> dict:
    """Closed loop: each stream sends its next request when the previous one finishes."""
    params = SamplingParams(max_tokens=max_tokens)
    queue = [prompts[i % len(prompts)] for i in range(streams * per_stream)]
    sent: dict[str, tuple[int, float]] = {}  # request id -> (prompt index, send time)
    ttft, tpot, outputs, first_at, tokens, failed = [], [], {}, {}, {}, 0

    def send():
        index = len(sent)
        request_id = router.add_request(queue[index], params)
        sent[request_id] = (index, time.perf_counter())

    busy_before = sum(load["busy_s"] for load in router.worker_loads()["target"])
    steps_before, overhead_before = router.steps, router.overhead_s
    start = time.perf_counter()
    for _ in range(min(streams, len(queue))):
        send()
    while router.has_unfinished():
        for d in router.step():
            now = time.perf_counter()
            index, sent_at = sent[d.request_id]
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.request_id not in first_at and d.token_ids:
                first_at[d.request_id] = now
                ttft.append(now - sent_at)
            if isinstance(d, FinalDelta):
                failed += d.finish_reason not in ("length", "eos", "stop")
                n = len(tokens[d.request_id])
                if n > 1:
                    tpot.append((now - first_at[d.request_id]) / (n - 1))
                outputs[index] = tokens[d.request_id]
                if len(sent) < len(queue):
                    send()
    wall = time.perf_counter() - start
    busy = sum(load["busy_s"] for load in router.worker_loads()["target"]) - busy_before
    steps = router.steps - steps_before
    return {
        "tokens_per_s": sum(len(t) for t in outputs.values()) / wall,
        "target_utilization": busy / (wall * len(router.targets)),
        "ttft": ttft, "tpot": tpot, "failed": failed,
        "outputs": [outputs[i] for i in sorted(outputs)],
        "overhead_ms_per_step": 1000 * (router.overhead_s - overhead_before) / max(steps, 1),
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, best kept (order rotated)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    config.limits.max_batch_size = max(config.limits.max_batch_size, max(args.concurrency))
    if args.k is not None:
        config.speculation.k = args.k
    variants = {"pipelined": (config.speculation.k, True), "unpipelined": (config.speculation.k, False),
                "baseline": (0, True)}
    resources = {}
    for pool in (config.cluster.target_pool, config.cluster.draft_pool):
        for name, amount in pool.resources.items():
            resources[name] = resources.get(name, 0) + amount * pool.replicas * len(variants)
    ray.init(num_cpus=args.num_cpus, resources=resources, include_dashboard=False, log_to_driver=False)
    routers = {}
    for name, (k, pipelining) in variants.items():
        cfg = copy.deepcopy(config)
        cfg.speculation.k, cfg.cluster.pipelining = k, pipelining
        cfg.cluster.target_pool.num_cpus = cfg.cluster.draft_pool.num_cpus = 0  # placement by custom resources
        routers[name] = Router(cfg)
        routers[name].wait_ready()
    prompts = load_prompts(routers["baseline"].tokenizer, raw=False)
    for router in routers.values():  # warm-up
        drive(router, prompts, 1, 1, 8)

    rows = []
    for n in args.concurrency:
        per_stream = args.requests_per_stream if n < 16 else 1
        runs: dict[str, dict] = {}
        names = list(routers)
        for rep in range(args.repeats):  # rotate the order so no variant always runs first or last; keep the best
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                run = drive(routers[name], prompts, n, per_stream, args.max_tokens)
                if name not in runs or run["tokens_per_s"] > runs[name]["tokens_per_s"]:
                    runs[name] = run
        spec, base, flat = runs["pipelined"], runs["baseline"], runs["unpipelined"]
        rows.append({
            "concurrency": n,
            "tokens_per_s": round(spec["tokens_per_s"], 2),
            "tokens_per_s_baseline": round(base["tokens_per_s"], 2),
            "tokens_per_s_unpipelined": round(flat["tokens_per_s"], 2),
            "speedup": round(spec["tokens_per_s"] / base["tokens_per_s"], 3),
            "target_utilization": round(spec["target_utilization"], 3),
            "target_utilization_unpipelined": round(flat["target_utilization"], 3),
            "target_utilization_baseline": round(base["target_utilization"], 3),
            "p50_ttft_ms": round(1000 * pct(spec["ttft"], 0.5), 1),
            "p99_ttft_ms": round(1000 * pct(spec["ttft"], 0.99), 1),
            "p50_tpot_ms": round(1000 * pct(spec["tpot"], 0.5), 1),
            "p99_tpot_ms": round(1000 * pct(spec["tpot"], 0.99), 1),
            "overhead_ms_per_step": round(spec["overhead_ms_per_step"], 2),
            "failed_requests": spec["failed"] + flat["failed"] + base["failed"],
            "exact": spec["outputs"] == base["outputs"] == flat["outputs"],
        })
    for router in routers.values():
        router.shutdown()
    ray.shutdown()
    result = {"target": config.target.path.rsplit("/", 1)[-1], "drafter": config.drafter.kind,
              "k": config.speculation.k, "adaptive": config.speculation.adaptive, "max_tokens": args.max_tokens,
              "rows": rows}
    emit(result, args.json, ["concurrency", "tokens_per_s", "tokens_per_s_baseline", "tokens_per_s_unpipelined",
                             "speedup", "target_utilization", "target_utilization_unpipelined", "p50_ttft_ms",
                             "p99_ttft_ms", "p50_tpot_ms", "overhead_ms_per_step", "failed_requests", "exact"])
    return result


def emit(result: dict, as_json: bool, cols: list[str] | None = None) -> None:
    """One JSON object, or a header line and a `|`-separated table of result["rows"]."""
    if as_json:
        print(json.dumps(result))
        return
    print(" ".join(f"{k}={v}" for k, v in result.items() if k != "rows"))
    cols = cols or list(result["rows"][0])
    print(" | ".join(cols))
    for row in result["rows"]:
        print(" | ".join(str(row[c]) for c in cols))


if __name__ == "__main__":
    main()
