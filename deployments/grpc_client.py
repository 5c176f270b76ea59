"""A small gRPC client: streams a completion and prints the statistics.

    python -m deployments.grpc_client "def fibonacci(n):" [--target 127.0.0.1:50051] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from specdec.v1 import generation_pb2 as pb
from specdec.v1 import generation_pb2_grpc as pb_grpc


# A replica that dies answers UNAVAILABLE; gRPC retries a call that has received nothing yet, and the
# new connection lands on a live replica (a stream that already got tokens is not retried: the client
# sees UNAVAILABLE and may resend with the reported seed).
RETRY_POLICY = {"methodConfig": [{"name": [{"service": "specdec.v1.Generation"}], "retryPolicy": {
    "maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"]}}]}
RETRYING = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_POLICY))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None, help="replay a sampled request (the server reports its seed)")
    args = parser.parse_args(argv)
    metadata = [("authorization", f"Bearer {os.environ['SPECDEC_API_KEY']}")] if os.environ.get("SPECDEC_API_KEY") else []
    with grpc.insecure_channel(args.target, options=RETRYING) as channel:
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                     include_stats=True, seed=args.seed)
        try:
            for message in stub.GenerateStream(request, metadata=metadata):
                print(message.text, end="", flush=True)
                if message.finish_reason:
                    s = message.stats
                    print(f"\n\n[finish={message.finish_reason} prompt_tokens={message.prompt_tokens} "
                          f"completion_tokens={message.completion_tokens} target_passes={s.target_passes} "
                          f"drafted={s.drafted_tokens} accepted={s.accepted_tokens} "
                          f"acceptance={s.acceptance_rate:.2f} seed={message.seed}]")
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
