"""N concurrent streaming gRPC clients against the front door, and the same Ray router driven directly,
in one run: tokens/s, time to first token and time per output token (p50/p99), front-door overhead.

    python -m benchmarks.grpc_load --config configs/default.yaml --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import grpc
import ray

from benchmarks.cluster_load import drive, pct
from benchmarks.report import emit
from benchmarks.speculative import load_prompts
from cluster.config import load_config
from cluster.router import Router
from cluster.serving.driver import EngineDriver
from deployments.grpc_ingress import build_server
from specdec.v1 import generation_pb2 as pb
from specdec.v1 import generation_pb2_grpc as pb_grpc


def grpc_streams(target: str, prompts: list[str], streams: int, per_stream: int, max_tokens: int) -> dict:
    """Closed loop over gRPC: each client thread sends its next request when the previous one ends."""
    ttft, tpot, tokens, failed = [], [], [0], [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            for r in range(per_stream):
                prompt = prompts[(index * per_stream + r) % len(prompts)]
                sent, first, count = time.perf_counter(), None, 0
                try:
                    for message in stub.GenerateStream(pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens)):
                        if first is None and message.completion_tokens:
                            first = time.perf_counter()
                        count = message.completion_tokens
                except grpc.RpcError:
                    with lock:
                        failed[0] += 1
                    continue
                done = time.perf_counter()
                with lock:
                    tokens[0] += count
                    ttft.append(first - sent)
                    if count > 1:
                        tpot.append((done - first) / (count - 1))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens[0] / wall, "ttft": ttft, "tpot": tpot, "failed": failed[0]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    config.limits.max_batch_size = max(config.limits.max_batch_size, max(args.concurrency))
    config.cluster.target_pool.num_cpus = config.cluster.draft_pool.num_cpus = 0
    ray.init(num_cpus=2, resources={"target_node": 2, "draft_node": 2}, include_dashboard=False, log_to_driver=False)
    router = Router(config)
    router.wait_ready()
    prompts = load_prompts(router.tokenizer, raw=False)
    drive(router, prompts, 1, 1, 8)  # warm-up
    rows = []
    for n in args.concurrency:
        per_stream = args.requests_per_stream if n < 16 else 1
        direct = drive(router, prompts, n, per_stream, args.max_tokens)  # the router, no front door
        driver = EngineDriver(router)
        server, port = build_server(driver, Path(config.target.path).name, config.drafter.kind,
                                    router.max_model_len, 0)
        served = grpc_streams(f"127.0.0.1:{port}", prompts, n, per_stream, args.max_tokens)
        server.stop(0)
        driver.close()
        rows.append({
            "concurrency": n,
            "tokens_per_s": round(served["tokens_per_s"], 2),
            "tokens_per_s_direct": round(direct["tokens_per_s"], 2),
            "front_door_throughput_ratio": round(served["tokens_per_s"] / direct["tokens_per_s"], 3),
            "p50_ttft_ms": round(1000 * pct(served["ttft"], 0.5), 1),
            "p99_ttft_ms": round(1000 * pct(served["ttft"], 0.99), 1),
            "p50_ttft_ms_direct": round(1000 * pct(direct["ttft"], 0.5), 1),
            "p50_tpot_ms": round(1000 * pct(served["tpot"], 0.5), 1),
            "p99_tpot_ms": round(1000 * pct(served["tpot"], 0.99), 1),
            "p50_tpot_ms_direct": round(1000 * pct(direct["tpot"], 0.5), 1),
            "failed_requests": served["failed"],
        })
    router.shutdown()
    ray.shutdown()
    result = {"target": Path(config.target.path).name, "drafter": config.drafter.kind, "rows": rows}
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
