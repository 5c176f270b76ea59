"""The embedded default: a local Ray with target and draft resources, the whole Serve application,
gRPC on :50051 and OpenAI HTTP on :8000. Ctrl-C stops it.

    python -m deployments.run_local [--config configs/default.yaml]
"""

from __future__ import annotations

import argparse
import time

from pathlib import Path

import ray
import yaml
from ray import serve

from deployments.builders import build_app

SERVE_CONFIG = Path(__file__).parent / "configs" / "serve.yaml"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=50051)
    args = parser.parse_args(argv)
    ray.init(resources={"target_node": 2, "draft_node": 2, "ingress": 1}, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]  # the same app as `serve run` and k8s
    app_args = app["args"] | {"config": args.config, "grpc_port": args.grpc_port,
                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    serve.run(build_app(app_args), name=app["name"], route_prefix=app["route_prefix"])
    print(f"serving: gRPC 127.0.0.1:{args.grpc_port} (specdec.v1.Generation, grpc.health.v1, reflection), "
          f"HTTP http://127.0.0.1:{args.http_port}/v1 (OpenAI-compatible). Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
