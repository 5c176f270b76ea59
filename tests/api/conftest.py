"""A real server for front-door tests: the in-process engine behind a driver, a gRPC server and the
OpenAI app under uvicorn, on free loopback ports. Its target fails, alone, any request seeded
FAULT_SEED: the deliberately injected internal fault."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
import pytest
import uvicorn

from cluster.drafters.ngram import NgramDrafter
from cluster.engine import SpecEngine
from cluster.serving.driver import EngineDriver, last_delta
from cluster.workers.target_worker import TargetWorker
from deployments import openai_api
from deployments.grpc_ingress import build_server
from specdec.v1 import generation_pb2_grpc as pb_grpc

FAULT_SEED = 666
PROMPT = "class Parser:\n    def __init__(self, text):\n"


class FaultyTarget(TargetWorker):
    """Raises inside the verify pass for sequences seeded FAULT_SEED (the worker must isolate them)."""

    def _accept(self, logits, seqs, items):
        if any(s.params.seed == FAULT_SEED for s in seqs):
            raise RuntimeError("injected fault /secret/path/model.py at 10.0.0.7")
        return super()._accept(logits, seqs, items)


class SlowDrafter(NgramDrafter):
    """Prompt lookup that takes `delay_s` a step, like a real draft model: a long generation then takes
    seconds, so tests measure cancellation instead of racing a 1 ms tiny-model step."""

    def __init__(self, delay_s: float = 0.02):
        super().__init__()
        self.delay_s = delay_s

    def propose(self, batch):
        time.sleep(self.delay_s)
        return super().propose(batch)


def full_batch_runs_at_once(server: "Server", max_tokens: int = 48) -> list:
    """Submit max_batch_size requests together; assert they all run in one step (capacity is back to
    full) and return their final deltas."""
    engine = server.engine
    size = engine.config.limits.max_batch_size
    assert engine.target.backend.cache.num_free == size
    peak, step = [0], engine.step

    def watched():
        out = step()
        peak[0] = max(peak[0], len(engine.running))
        return out

    engine.step = watched
    try:
        finals = [last_delta(s) for s in server.driver.stream_many([(PROMPT, engine.default_params(max_tokens=max_tokens))] * size)]
    finally:
        del engine.step
    assert all(f is not None and f.finish_reason in ("length", "eos") for f in finals)
    assert peak[0] == size
    return finals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    engine: SpecEngine
    driver: EngineDriver
    http: str
    grpc_target: str
    grpc_port: int
    channel: grpc.Channel

    @property
    def stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(self.channel)

    def post(self, path: str, body, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.http + path, data, {"Content-Type": "application/json"} | (headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                return error.code, json.loads(payload)
            except json.JSONDecodeError:
                return error.code, {"raw": payload.decode(errors="replace")}

    def sse(self, path: str, body) -> list[dict]:
        request = urllib.request.Request(self.http + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                line = line.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
        return events

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.http + path, timeout=30) as response:
            return response.status, response.read().decode()

    def occupancy(self) -> int:
        """Slots and sequences held anywhere in the engine (0 when idle)."""
        return self.driver.call(lambda e: e.target.backend.cache.occupied + len(e.target.seqs) + len(e.running)
                                + len(e.waiting) + (e.drafter.num_sequences if e.drafter else 0))

    def wait_idle(self, timeout: float = 10.0) -> int:
        deadline = time.time() + timeout
        while self.occupancy() and time.time() < deadline:
            time.sleep(0.02)
        return self.occupancy()


def start_server(engine: SpecEngine, api_key: str | None = None):
    driver = EngineDriver(engine)
    grpc_server, grpc_port = build_server(driver, "tiny", "model", engine.max_model_len, 0, api_key)
    openai_api.configure(driver, "tiny", api_key)
    http_port = free_port()
    uv = uvicorn.Server(uvicorn.Config(openai_api.app, host="127.0.0.1", port=http_port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    server = Server(engine, driver, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", grpc_port, channel)

    def stop():
        channel.close()
        grpc_server.stop(0)
        uv.should_exit = True
        thread.join(timeout=10)
        driver.close()
        openai_api.configure(None, "", None)

    return server, stop


@pytest.fixture(scope="module")
def faulty_engine_factory(make_engine):
    """faulty_engine_factory(**limits) -> a SpecEngine (model drafter, K=4) whose target has FaultyTarget's fault."""

    def factory(**limits):
        base = make_engine("model", k=4, draft="draft_noisy", **limits)
        target = FaultyTarget(base.config.target, base.config.limits.max_batch_size, base.target.backend.cache.capacity,
                              model=base.target.backend.model, extra_eos=tuple(base.target.eos_ids))
        return SpecEngine(base.config, tokenizer=base.tokenizer, target=target)

    return factory


@pytest.fixture(scope="module")
def server(faulty_engine_factory):
    engine = faulty_engine_factory(max_model_len=128, max_tokens=64, max_batch_size=8, max_n=4)
    srv, stop = start_server(engine)
    yield srv
    stop()
