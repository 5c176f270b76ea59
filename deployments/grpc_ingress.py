"""The gRPC front door: specdec.v1.Generation, plus grpc.health.v1 and server reflection on one port.

    python -m deployments.grpc_ingress --config configs/default.yaml --port 50051 [--ray]
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.errors import EngineOverloadedError, InvalidRequestError
from cluster.serving.driver import EngineDriver
from cluster.types import FinalDelta, SamplingParams, SpecStats
from specdec.v1 import generation_pb2 as pb
from specdec.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
API_KEY_ENV = "SPECDEC_API_KEY"


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, driver: EngineDriver, model_id: str, drafter: str, max_model_len: int):
        self.driver, self.model_id, self.drafter, self.max_model_len = driver, model_id, drafter, max_model_len

    def Generate(self, request, context):
        params = self._params(request, context)
        with _status_errors(context):
            final = self.driver.generate(request.prompt, params, context.is_active)
        if final is None:  # the client went away: nothing to answer
            context.abort(grpc.StatusCode.CANCELLED, "request cancelled")
        return pb.GenerateResponse(
            text=final.full_text, prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens,
            finish_reason=final.finish_reason, stats=_stats(final.stats) if request.include_stats else None,
        )

    def GenerateStream(self, request, context):
        params = self._params(request, context)
        tokens = 0
        with _status_errors(context):
            for delta in self.driver.stream(request.prompt, params, context.is_active):
                tokens += len(delta.token_ids)
                message = pb.GenerateStreamResponse(text=delta.text, completion_tokens=tokens)
                if isinstance(delta, FinalDelta):
                    message.finish_reason = delta.finish_reason
                    message.prompt_tokens = delta.prompt_tokens
                    if request.include_stats:
                        message.stats.CopyFrom(_stats(delta.stats))
                yield message

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=self.model_id, drafter=self.drafter,
                                                          max_model_len=self.max_model_len)])

    def _params(self, request, context) -> SamplingParams:
        if request.model and request.model != self.model_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"model: unknown model {request.model!r}; served: [{self.model_id!r}]")
        overrides = dict(temperature=request.temperature, top_k=request.top_k, stop=tuple(request.stop))
        if request.HasField("max_tokens"):
            overrides["max_tokens"] = request.max_tokens
        if request.HasField("top_p"):
            overrides["top_p"] = request.top_p
        if request.HasField("seed"):
            overrides["seed"] = request.seed
        return self.driver.engine.default_params(**overrides)


class _status_errors:
    """Map the engine's typed errors to gRPC status codes (context manager)."""

    def __init__(self, context):
        self.context = context

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, InvalidRequestError):
            self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if isinstance(error, EngineOverloadedError):
            self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        return False


def _stats(stats: SpecStats) -> pb.SpeculationStats:
    return pb.SpeculationStats(target_passes=stats.steps, drafted_tokens=stats.drafted,
                               accepted_tokens=stats.accepted, acceptance_rate=stats.acceptance_rate)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Require `authorization: Bearer KEY` (or `x-api-key: KEY`) on every call but health checks,
    which orchestrators send without credentials."""

    def __init__(self, key: str):
        self.key = key.encode()

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        metadata = dict(details.invocation_metadata)
        given = metadata.get("x-api-key") or metadata.get("authorization", "").removeprefix("Bearer ").strip()
        if given and hmac.compare_digest(given.encode(), self.key):
            return continuation(details)
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        )


def build_server(driver: EngineDriver, model_id: str, drafter: str, max_model_len: int, port: int,
                 api_key: str | None = None, max_workers: int = 32, host: str = "127.0.0.1") -> tuple[grpc.Server, int]:
    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors)
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(driver, model_id, drafter, max_model_len), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


def main(argv=None) -> None:
    from cluster.config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--ray", action="store_true", help="run the Ray router (draft/target actors), not in-process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = load_config(args.config)
    if args.ray:
        import ray

        from cluster.router import Router

        ray.init(resources={"target_node": 1, "draft_node": 1})
        engine = Router(config)
        engine.wait_ready()
    else:
        from cluster.engine import SpecEngine

        engine = SpecEngine(config)
    driver = EngineDriver(engine)
    server, port = build_server(driver, Path(config.target.path).name, config.drafter.kind, engine.max_model_len,
                                args.port, os.environ.get(API_KEY_ENV) or None, host=args.host)
    log.info("serving %s on %s:%d", SERVICE, args.host, port)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
