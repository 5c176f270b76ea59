"""The only place classes become Ray Serve deployments. `serve run deployments/configs/serve.yaml`
(or `serve deploy`) imports `build_app` with the YAML's args."""

from __future__ import annotations

from pathlib import Path

from ray import serve

from deployments import openai_api
from deployments.autoscaling import POLICY
from deployments.server import SpecDecServer

# Scaled on requests in flight on gRPC and HTTP together (Serve alone counts only HTTP and handles)
DEFAULT_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                       "policy": {"policy_function": POLICY}}
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_config(path: str) -> str:
    """`serve deploy` and KubeRay build the app in the Serve controller, whose working directory is not
    the project: a relative path that is not found there is taken relative to the project root."""
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = PROJECT_ROOT / candidate
    return str(candidate.resolve())


def build_app(args: dict):
    """args: config (engine YAML path), grpc_port, grpc_host (default loopback), engine ("router" |
    "local"), drain_timeout_s, autoscaling_config (its policy defaults to deployments.autoscaling's), ray_actor_options.
    Each replica is one router; its draft and target pools are its own, or shared by every replica
    when the engine config sets cluster.shared_pools.enabled."""
    drain_timeout_s = float(args.get("drain_timeout_s", 30))
    deployment = serve.deployment(
        name="SpecDecServer",
        autoscaling_config={"policy": DEFAULT_AUTOSCALING["policy"]} | args.get("autoscaling_config", DEFAULT_AUTOSCALING),
        max_ongoing_requests=int(args.get("max_ongoing_requests", 64)),
        graceful_shutdown_timeout_s=float(args.get("graceful_shutdown_timeout_s", 60)),
        health_check_period_s=10,
        ray_actor_options=args.get("ray_actor_options", {"num_cpus": 0}),
    )(serve.ingress(openai_api.app)(SpecDecServer))
    return deployment.bind(
        config_path=resolve_config(args.get("config", "configs/default.yaml")),
        grpc_port=int(args.get("grpc_port", 50051)),
        grpc_host=str(args.get("grpc_host", "127.0.0.1")),
        engine=args.get("engine", "router"),
        drain_timeout_s=drain_timeout_s,
    )
