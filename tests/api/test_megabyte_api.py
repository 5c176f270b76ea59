"""MEGABYTE through the front doors (issue 13): the same HTTP and gRPC APIs and validation, bytes in and
out through the byte codec, streamed without ever splitting a character."""

import pytest

from cluster.types import SamplingParams
from specdec.v1 import generation_pb2 as pb
from tests.api.conftest import start_server
from tests.engine.test_megabyte import _engine, tiny_megabyte  # noqa: F401 (the fixture)

PROMPT = "def grüße(n):\n    return \"€\" * n\n"


@pytest.fixture(scope="module")
def byte_server(tiny_megabyte):
    srv, stop = start_server(_engine(tiny_megabyte, 4))
    yield srv
    stop()


def test_completions_and_grpc_serve_the_byte_model(byte_server):
    engine = byte_server.engine
    expected = engine.generate([PROMPT], SamplingParams(max_tokens=24))[0]
    status, body = byte_server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == expected.text
    assert body["usage"]["prompt_tokens"] == len(PROMPT.encode())  # one token a byte
    reply = byte_server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=24))
    assert reply.text == expected.text


def test_streams_never_split_a_character(byte_server):
    events = byte_server.sse("/v1/completions", {"prompt": PROMPT, "max_tokens": 48, "temperature": 0.9, "seed": 3,
                                                 "stream": True})
    pieces = [e["choices"][0]["text"] for e in events if e.get("choices")]
    assert pieces and all("\ufffd" not in p for p in pieces)
    whole = byte_server.engine.generate([PROMPT], SamplingParams(max_tokens=48, temperature=0.9, seed=3))[0]
    assert "".join(pieces) == whole.text


def test_the_same_validation_applies(byte_server):
    status, body = byte_server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": -1})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = byte_server.post("/v1/completions", {"prompt": [3, 300], "max_tokens": 8})  # ids are bytes
    assert status == 400 and body["error"]["param"] == "prompt"
