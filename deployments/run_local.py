"""The embedded default: a local Ray with target and draft resources, the whole Serve application,
gRPC and OpenAI HTTP. Every listener is on loopback unless --host says otherwise; there is no Ray
dashboard. SIGINT (Ctrl-C) or SIGTERM drains: new requests are refused, those in flight finish (up to
--drain-timeout), then Serve and Ray are shut down and nothing is left running.

    python -m deployments.run_local [--config configs/default.yaml] [--http-port 8000] [--grpc-port 50051]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

import ray
import yaml
from ray import serve

from deployments.builders import build_app
from deployments.grpc_ingress import API_KEY_ENV, warn_if_exposed

SERVE_CONFIG = Path(__file__).parent / "configs" / "serve.yaml"
log = logging.getLogger("run_local")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--host", default="127.0.0.1", help="address gRPC and HTTP bind (default: loopback only)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests may finish")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A shell that starts us in the background ignores SIGINT for us; install both handlers ourselves.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    warn_if_exposed(args.host, os.environ.get(API_KEY_ENV), "HTTP and gRPC")
    # address="local": always a new local Ray of our own, so two servers can run side by side.
    ray.init(address="local", resources={"target_node": 2, "draft_node": 2, "ingress": 1}, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.http_port})
        app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]  # the same app as `serve run` and k8s
        app_args = app["args"] | {"config": args.config, "grpc_port": args.grpc_port, "grpc_host": args.host,
                                  "drain_timeout_s": args.drain_timeout,
                                  "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
        handle = serve.run(build_app(app_args), name=app["name"], route_prefix=app["route_prefix"])
        print(f"serving: gRPC {args.host}:{args.grpc_port} (specdec.v1.Generation, grpc.health.v1, reflection), "
              f"HTTP http://{args.host}:{args.http_port}/v1 (OpenAI-compatible; /metrics). Ctrl-C to stop.",
              flush=True)
        stop.wait()
        print("draining: new requests are refused; waiting for those in flight", flush=True)
        left = handle.drain.remote(args.drain_timeout).result(timeout_s=args.drain_timeout + 30)
        print(f"drained ({left} request(s) cut off); shutting down", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
