"""The gRPC front door with real clients: generated stubs, grpc.health.v1, reflection, errors, cancel, auth."""

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.engine import SpecEngine
from cluster.serving.driver import EngineDriver
from deployments.grpc_ingress import SERVICE, build_server
from specdec.v1 import generation_pb2 as pb
from specdec.v1 import generation_pb2_grpc as pb_grpc
from tools.gen_proto import generate
from tests.api.conftest import SlowDrafter

PROMPT = "class Parser:\n    def __init__(self, text):\n"


def _serve(engine, api_key=None):
    driver = EngineDriver(engine)
    server, port = build_server(driver, "tiny", "model", engine.max_model_len, 0, api_key)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return driver, server, channel


@pytest.fixture(scope="module")
def served(make_engine):
    driver, server, channel = _serve(make_engine("model", k=4, draft="draft_noisy", max_model_len=96, max_tokens=64))
    yield driver, pb_grpc.GenerationStub(channel), channel
    channel.close()
    server.stop(0)
    driver.close()


def _occupied(driver) -> int:
    return driver.call(lambda e: e.target.backend.cache.occupied + e.drafter.num_sequences + len(e.running))


def _wait_freed(driver, timeout=5.0):
    deadline = time.time() + timeout
    while _occupied(driver) and time.time() < deadline:
        time.sleep(0.05)
    return _occupied(driver)


def test_stubs_match_the_proto(tmp_path):
    for generated in generate(tmp_path):
        committed = Path("proto") / generated.relative_to(tmp_path)
        assert committed.read_text() == generated.read_text(), f"{committed} is stale: run python -m tools.gen_proto"


def test_unary_greedy_equals_target_only(served, make_engine):
    _, stub, _ = served
    expected = make_engine("ngram", k=0).generate([PROMPT], make_engine("ngram", k=0).default_params(max_tokens=20))[0]
    response = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=20, include_stats=True))
    assert response.text == expected.text
    assert response.completion_tokens == len(expected.token_ids) and response.finish_reason == expected.finish_reason
    assert response.prompt_tokens == expected.prompt_tokens
    assert response.stats.target_passes > 0 and response.stats.drafted_tokens > 0


def test_stream_adds_up_to_unary(served):
    _, stub, _ = served
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=20, include_stats=True)
    messages = list(stub.GenerateStream(request))
    unary = stub.Generate(request)
    assert len(messages) > 1 and "".join(m.text for m in messages) == unary.text
    assert all(not m.finish_reason for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason == unary.finish_reason and last.completion_tokens == unary.completion_tokens
    assert last.stats.target_passes > 0 and last.prompt_tokens == unary.prompt_tokens


def test_health_reflection_and_models(served):
    _, stub, channel = served
    health_stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        assert health_stub.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection_stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection_stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [(m.id, m.drafter) for m in models] == [("tiny", "model")]


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="word " * 200), "prompt"),
        (dict(prompt=PROMPT, max_tokens=0), "max_tokens"),
        (dict(prompt=PROMPT, max_tokens=65), "max_tokens"),
        (dict(prompt=PROMPT, temperature=-0.5), "temperature"),
        (dict(prompt=PROMPT, top_p=0.0), "top_p"),
        (dict(prompt=PROMPT, top_p=1.5), "top_p"),
        (dict(prompt=PROMPT, model="gpt-17"), "model"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(served, fields, field):
    _, stub, _ = served
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(pb.GenerateRequest(**fields))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field)
    assert stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=3)).completion_tokens == 3


@pytest.fixture(scope="module")
def slow(make_engine):
    base = make_engine("ngram", k=3, max_tokens=400, max_model_len=512)
    engine = SpecEngine(base.config, tokenizer=base.tokenizer, target=base.target, drafter=SlowDrafter(0.02))
    driver, server, channel = _serve(engine)
    yield driver, pb_grpc.GenerationStub(channel)
    channel.close()
    server.stop(0)
    driver.close()


def _steps(driver) -> int:
    return driver.call(lambda e: e.timings.steps)


def _cancelled(driver) -> float:
    return driver.call(lambda e: e.metrics.value("specdec_requests_total", finish_reason="cancelled"))


def test_cancelled_stream_stops_generation_and_frees_caches(slow):
    driver, stub = slow
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=300, stop=["never-generated"])
    call = stub.GenerateStream(request)
    next(call)
    next(call)
    cancelled, at_cancel = _cancelled(driver), _steps(driver)
    call.cancel()
    assert _wait_freed(driver) == 0
    # ~300 steps were left; the cancel crosses gRPC's callback thread and the driver's queue,
    # which on a loaded 2-core machine takes a few 20 ms steps (6 seen in CI), never dozens
    assert _steps(driver) - at_cancel <= 30
    assert _cancelled(driver) == cancelled + 1
    assert stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=3)).completion_tokens == 3


def test_deadline_stops_generation(slow):
    driver, stub = slow
    cancelled, before = _cancelled(driver), _steps(driver)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=300, stop=["never-generated"]), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_freed(driver) == 0
    assert _cancelled(driver) == cancelled + 1
    assert _steps(driver) - before < 100  # a full run is ~300 steps of >= 20 ms


def test_cancelling_a_waiting_request_removes_it(make_engine):
    """With the only slot busy, a second stream waits; cancelling it removes it from the queue."""
    base = make_engine("ngram", k=3, max_tokens=400, max_model_len=512, max_batch_size=1)
    engine = SpecEngine(base.config, tokenizer=base.tokenizer, target=base.target, drafter=SlowDrafter(0.02))
    driver, server, channel = _serve(engine)
    try:
        stub = pb_grpc.GenerationStub(channel)
        running = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_tokens=300))
        next(running)
        waiting = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_tokens=300))
        deadline = time.time() + 10
        while not driver.call(lambda e: len(e.waiting)) and time.time() < deadline:
            time.sleep(0.02)
        assert driver.call(lambda e: len(e.waiting)) == 1
        waiting.cancel()
        deadline = time.time() + 10
        while driver.call(lambda e: len(e.waiting)) and time.time() < deadline:
            time.sleep(0.02)
        assert driver.call(lambda e: len(e.waiting)) == 0 and driver.call(lambda e: len(e.running)) == 1
        running.cancel()
        assert _wait_freed(driver) == 0
    finally:
        channel.close()
        server.stop(0)
        driver.close()


def test_overload_is_resource_exhausted(make_engine):
    # a slow drafter keeps the running stream going for seconds: with 1 ms tiny-model steps it finished
    # before the third request arrived on a fast CI machine, and the queue had room again
    base = make_engine("ngram", k=2, max_batch_size=1, max_waiting=1, max_tokens=400, max_model_len=512)
    engine = SpecEngine(base.config, tokenizer=base.tokenizer, target=base.target, drafter=SlowDrafter(0.02))
    driver, server, channel = _serve(engine)
    try:
        stub = pb_grpc.GenerationStub(channel)
        running = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_tokens=300, min_tokens=300))
        next(running)  # holds the only cache slot
        waiting = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_tokens=300))
        deadline = time.time() + 10
        while not driver.call(lambda e: len(e.waiting)) and time.time() < deadline:
            time.sleep(0.02)
        assert driver.call(lambda e: (len(e.running), len(e.waiting))) == (1, 1)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
        waiting.cancel()
        assert _wait_freed(driver) == 0
    finally:
        channel.close()
        server.stop(0)
        driver.close()


def test_api_key(make_engine):
    driver, server, channel = _serve(make_engine("ngram", k=2), api_key="s3cret")
    try:
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt=PROMPT, max_tokens=3)
        for metadata in ([], [("authorization", "Bearer wrong")], [("x-api-key", "nope")]):
            for call in (stub.Generate, lambda r, metadata: list(stub.GenerateStream(r, metadata=metadata))):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Generate(request, metadata=[("authorization", "Bearer s3cret")]).completion_tokens == 3
        assert stub.Generate(request, metadata=[("x-api-key", "s3cret")]).completion_tokens == 3
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())  # probes need no key
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        server.stop(0)
        driver.close()


def test_the_client_retries_unavailable_until_a_replica_answers(make_engine):
    """A replica that died answers UNAVAILABLE; the shipped client's retry policy resends until a live
    one answers (here: nothing listens at first, a server comes up on the port 0.3 s later)."""
    import socket
    import threading

    from deployments.grpc_client import RETRYING

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=3)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GenerationStub(plain).Generate(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # without the policy: fails at once
    engine = make_engine("ngram", k=2)
    started = {}

    def start():
        time.sleep(0.3)
        started["driver"] = EngineDriver(engine)
        started["server"], _ = build_server(started["driver"], "tiny", "ngram", engine.max_model_len, port)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=RETRYING) as channel:
            assert pb_grpc.GenerationStub(channel).Generate(request, timeout=10).completion_tokens == 3
    finally:
        thread.join()
        started["server"].stop(0)
        started["driver"].close()
