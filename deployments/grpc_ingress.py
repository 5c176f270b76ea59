"""The gRPC front door: specdec.v1.Generation, plus grpc.health.v1 and server reflection on one port.

    python -m deployments.grpc_ingress --config configs/default.yaml --port 50051 [--host 127.0.0.1] [--ray]

Every field of a request is honoured or refused with INVALID_ARGUMENT naming it. A request that fails
inside the server ends with INTERNAL and a request id (the traceback stays in the server log). The
server listens on loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import queue
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.errors import EngineOverloadedError, InvalidRequestError, ServerDrainingError
from cluster.serving.driver import EngineDriver, last_delta
from cluster.types import FINISH_ERROR, FinalDelta, SpecStats
from deployments.api import CHAT_ROLES, ApiRequest, Choice, chat_prompt, submit, token_text
from specdec.v1 import generation_pb2 as pb
from specdec.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
API_KEY_ENV = "SPECDEC_API_KEY"


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, driver: EngineDriver, model_id: str, drafter: str, max_model_len: int):
        self.driver, self.model_id, self.drafter, self.max_model_len = driver, model_id, drafter, max_model_len

    def Generate(self, request, context):
        api = self._request(request, context)
        with _status_errors(context, self.driver, "Generate"):
            choices = submit(self.driver, api, context.is_active)
            finals = _run_all(choices)
            if any(f is None for f in finals):  # the client went away: nothing to answer
                context.abort(grpc.StatusCode.CANCELLED, "request cancelled")
            _abort_if_failed(context, choices, finals)
        out = [self._choice(api, request, c, f) for c, f in zip(choices, finals)]
        first = out[0]
        return pb.GenerateResponse(
            text=first.text, prompt_tokens=finals[0].prompt_tokens, completion_tokens=first.completion_tokens,
            finish_reason=first.finish_reason, stats=first.stats if request.include_stats else None,
            seed=first.seed, logprobs=first.logprobs, choices=out,
        )

    def GenerateStream(self, request, context):
        api = self._request(request, context)
        with _status_errors(context, self.driver, "GenerateStream"):
            choices = submit(self.driver, api, context.is_active)
            tokens = {c.index: 0 for c in choices}
            for c, delta in _interleave(choices):
                tokens[c.index] += len(delta.token_ids)
                message = pb.GenerateStreamResponse(text=delta.text, completion_tokens=tokens[c.index], index=c.index)
                if delta.logprobs:
                    message.logprobs.extend(self._logprobs(delta.logprobs))
                if c.echo_text and tokens[c.index] == len(delta.token_ids):  # first message of this sample
                    message.text = c.echo_text + message.text
                if isinstance(delta, FinalDelta):
                    _abort_if_failed(context, [c], [delta])
                    message.finish_reason = delta.finish_reason
                    message.prompt_tokens = delta.prompt_tokens
                    message.seed = delta.seed
                    if request.include_stats:
                        message.stats.CopyFrom(_stats(delta.stats))
                yield message

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=self.model_id, drafter=self.drafter,
                                                          max_model_len=self.max_model_len)])

    # --- request and response mapping --------------------------------------------------------------
    def _request(self, request, context) -> ApiRequest:
        try:
            return self._parse(request)
        except InvalidRequestError as e:
            self.driver.metrics.api_requests.labels("grpc", "Generation", "INVALID_ARGUMENT").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _parse(self, request) -> ApiRequest:
        if request.model and request.model != self.model_id:
            raise InvalidRequestError("model", f"unknown model {request.model!r}; served: [{self.model_id!r}]")
        given = [name for name in ("prompt", "prompt_token_ids", "messages") if _is_set(request, name)]
        if len(given) != 1:
            raise InvalidRequestError("prompt", "send exactly one of prompt, prompt_token_ids, messages")
        if request.messages:
            for i, m in enumerate(request.messages):
                if m.role not in CHAT_ROLES:
                    raise InvalidRequestError(f"messages[{i}].role", f"unknown role {m.role!r}; known: {sorted(CHAT_ROLES)}")
            prompt = chat_prompt(self.driver.tokenizer, [{"role": m.role, "content": m.content} for m in request.messages])
        else:
            prompt = request.prompt if request.prompt else list(request.prompt_token_ids)
        overrides = dict(temperature=request.temperature, top_k=request.top_k, stop=tuple(request.stop),
                         presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                         logit_bias=tuple(sorted(request.logit_bias.items())), min_tokens=request.min_tokens)
        for name in ("max_tokens", "top_p", "seed", "repetition_penalty", "logprobs"):
            if request.HasField(name):
                overrides[name] = getattr(request, name)
        n = request.n or 1
        if n > self.driver.limits.max_n:
            raise InvalidRequestError("n", f"must be in [1, {self.driver.limits.max_n}], got {n}")
        if request.echo and request.HasField("logprobs"):
            raise InvalidRequestError("echo", "echo with logprobs (prompt logprobs) is not supported")
        return ApiRequest([prompt], self.driver.default_params(**overrides), n, request.echo)

    def _choice(self, api: ApiRequest, request, c: Choice, final: FinalDelta) -> pb.Choice:
        choice = pb.Choice(index=c.index, text=c.echo_text + final.full_text, completion_tokens=final.completion_tokens,
                           finish_reason=final.finish_reason, seed=final.seed)
        if request.include_stats:
            choice.stats.CopyFrom(_stats(final.stats))
        if final.full_logprobs:
            choice.logprobs.extend(self._logprobs(final.full_logprobs))
        return choice

    def _logprobs(self, entries) -> list[pb.TokenLogprob]:
        tok = self.driver.tokenizer
        return [pb.TokenLogprob(token_id=e.token_id, token=token_text(tok, e.token_id), logprob=e.logprob,
                                top_logprobs=[pb.TopLogprob(token_id=t, token=token_text(tok, t), logprob=lp)
                                              for t, lp in e.top])
                for e in entries]


def _is_set(request, name: str) -> bool:
    value = getattr(request, name)
    return bool(value) if not isinstance(value, str) else value != ""


def _run_all(choices: list[Choice]) -> list[FinalDelta | None]:
    """Each sample to completion, concurrently (each stream is read in its own thread)."""
    if len(choices) == 1:
        return [last_delta(choices[0].stream)]
    with futures.ThreadPoolExecutor(len(choices)) as pool:
        return list(pool.map(lambda c: last_delta(c.stream), choices))


def _interleave(choices: list[Choice]):
    """(choice, delta) pairs from every sample as they arrive."""
    if len(choices) == 1:
        try:
            for delta in choices[0].stream:
                yield choices[0], delta
        finally:  # the client cancelled (the servicer's generator is closed): cancel the request now
            choices[0].stream.close()
        return
    merged: queue.Queue = queue.Queue()

    def pump(c: Choice):
        try:
            for delta in c.stream:
                merged.put((c, delta))
        finally:
            merged.put((c, None))

    threads = [threading.Thread(target=pump, args=(c,), daemon=True) for c in choices]
    for t in threads:
        t.start()
    try:
        remaining = len(choices)
        while remaining:
            c, delta = merged.get()
            if delta is None:
                remaining -= 1
                continue
            yield c, delta
    finally:
        for c in choices:
            c.stream.close()


def _abort_if_failed(context, choices: list[Choice], finals) -> None:
    failed = [c.stream.request_id for c, f in zip(choices, finals) if f is not None and f.finish_reason == FINISH_ERROR]
    if failed:
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {','.join(failed)})")


class _status_errors:
    """Map the engine's typed errors to gRPC status codes (context manager); count each call's outcome."""

    def __init__(self, context, driver, method: str):
        self.context, self.driver, self.method = context, driver, method

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, GeneratorExit):  # done, or the client closed the stream
            self._count("OK" if error is None else "CANCELLED")
            return False
        if self.context.code() is not None:  # already aborted with a status (context.abort raises)
            self._count(self.context.code().name)
            return False
        for kind_, code in ((InvalidRequestError, "INVALID_ARGUMENT"), (EngineOverloadedError, "RESOURCE_EXHAUSTED"),
                            (ServerDrainingError, "UNAVAILABLE")):
            if isinstance(error, kind_):
                self._count(code)
                self.context.abort(getattr(grpc.StatusCode, code), str(error))
        if isinstance(error, Exception):  # a bug: the client gets a bare INTERNAL, the log the traceback
            log.error("gRPC %s failed", self.method, exc_info=(kind, error, tb))
            self._count("INTERNAL")
            self.context.abort(grpc.StatusCode.INTERNAL, "internal error")
        return False

    def _count(self, code: str) -> None:
        self.driver.metrics.api_requests.labels("grpc", self.method, code).inc()


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


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, api_key: str | None, what: str) -> None:
    if not is_loopback(host) and not api_key:
        log.warning("%s listens on %s without an API key: anyone who can reach it can use it "
                    "(set %s, or bind 127.0.0.1)", what, host, API_KEY_ENV)


def build_server(driver: EngineDriver, model_id: str, drafter: str, max_model_len: int, port: int,
                 api_key: str | None = None, max_workers: int = 32, host: str = "127.0.0.1") -> tuple[grpc.Server, int]:
    warn_if_exposed(host, api_key, "gRPC")
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
    server.health = health_servicer  # drain flips it to NOT_SERVING
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

        ray.init(resources={"target_node": 1, "draft_node": 1}, include_dashboard=False)
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
