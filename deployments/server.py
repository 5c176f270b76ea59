"""One serving replica: the engine (Ray router over draft/target actors, or in-process), a driver
thread, the gRPC server, and the OpenAI HTTP app. A plain class; builders.py makes it a Serve deployment."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cluster.config import load_config
from cluster.serving.driver import EngineDriver
from deployments import openai_api
from deployments.autoscaling import IN_FLIGHT
from deployments.grpc_ingress import API_KEY_ENV, build_server

log = logging.getLogger(__name__)


class SpecDecServer:
    def __init__(self, config_path: str, grpc_port: int = 50051, grpc_host: str = "127.0.0.1",
                 engine: str = "router", drain_timeout_s: float = 30.0):
        config = load_config(config_path)
        if engine == "router":  # per-step traffic goes straight to the actors this router starts
            from cluster.router import Router

            self.engine = Router(config)
            self.engine.wait_ready()
        elif engine == "local":
            from cluster.engine import SpecEngine

            self.engine = SpecEngine(config)
        else:
            raise ValueError(f"engine: {engine!r} is not 'router' or 'local'")
        self.model_id = Path(config.target.path).name
        self.drain_timeout_s = drain_timeout_s
        self.driver = EngineDriver(self.engine)
        api_key = os.environ.get(API_KEY_ENV) or None
        openai_api.configure(self.driver, self.model_id, api_key)
        # Replicas on one node share the port (gRPC sets SO_REUSEPORT): the kernel spreads connections.
        self.grpc_server, self.grpc_port = build_server(
            self.driver, self.model_id, config.drafter.kind if config.speculation.k else "none",
            self.engine.max_model_len, grpc_port, api_key, host=grpc_host,
        )
        self._stopped = False
        log.info("gRPC on %s:%d, model %s", grpc_host, self.grpc_port, self.model_id)

    def check_health(self) -> None:
        """Ray Serve calls this; a dead driver thread makes the replica unhealthy and replaced."""
        if not self.driver.alive:
            raise RuntimeError("engine driver thread died")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve polls this: requests in flight here on gRPC and HTTP together (deployments/autoscaling.py)."""
        return {IN_FLIGHT: float(self.driver.in_flight)}

    def drain(self, timeout_s: float | None = None) -> int:
        """Stop taking requests (new ones get UNAVAILABLE / 503), let those in flight finish within the
        timeout. Returns how many were still in flight when it gave up (0: all finished)."""
        timeout_s = self.drain_timeout_s if timeout_s is None else timeout_s
        self.grpc_server.health.enter_graceful_shutdown()  # probes now see NOT_SERVING
        self.driver.drain(timeout_s)
        left = self.driver.in_flight
        log.info("drained: %d request(s) still in flight", left)
        return left

    def shutdown(self) -> None:
        """Graceful stop: drain, stop the gRPC server, then free the workers."""
        if self._stopped:
            return
        self._stopped = True
        self.drain()
        self.grpc_server.stop(grace=5).wait()
        self.driver.close()
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()

    def __del__(self):  # Serve deletes the replica on scale-down
        try:
            self.shutdown()
        except Exception:
            pass
