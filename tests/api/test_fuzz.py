"""Seeded, bounded fuzzing of the running server (issue 8): random and mutated JSON bodies and gRPC
messages while three normal streams run beside them. No 5xx but the injected fault, no normal stream
fails or changes, and afterwards a full batch runs at once."""

import json
import random
import threading

import grpc
import pytest

from specdec.v1 import generation_pb2 as pb
from tests.api.conftest import FAULT_SEED, PROMPT, full_batch_runs_at_once, start_server

HTTP_CASES, GRPC_CASES = 400, 200
KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
        "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "logit_bias", "logprobs", "top_logprobs", "echo", "best_of", "min_tokens", "user", "tools", "suffix",
        "response_format", "zzz_unknown"]


def _value(rng: random.Random):
    return rng.choice([
        None, True, False, 0, 1, -1, 3, 64, 65, 2**31, 2**63, 2**64, -2**63, 10**30, 0.5, -0.5, 1e-38, 1e308, -1e308,
        2.0, 100.5, "", "x", "ü\u0000\ud7ff" * 3, "word " * 50, [], [1, 2], [-1], [2**40], ["a", "b"], [[1, 2], [3]],
        [PROMPT], {}, {"a": 1}, {"5": 1}, {"5": 1e9}, {"include_usage": True}, [{"role": "user", "content": "hi"}],
        [{"role": "wizard", "content": 1}], [{"type": "text"}], float("nan"), float("inf"),
    ])


def _mutate(rng: random.Random, chat: bool) -> bytes:
    body = {"messages": [{"role": "user", "content": "def f(x):"}]} if chat else {"prompt": PROMPT}
    body |= {"max_tokens": rng.choice([1, 4, 8]), "temperature": rng.choice([0, 0.7, 1.0])}
    for _ in range(rng.randint(1, 4)):
        action = rng.random()
        key = rng.choice(KEYS)
        if not isinstance(body, dict):
            break
        if action < 0.55:
            body[key] = _value(rng)
        elif action < 0.7:
            body.pop(rng.choice(list(body) or ["x"]), None)
        elif action < 0.8 and "messages" in body and isinstance(body["messages"], list) and body["messages"]:
            body["messages"][0][rng.choice(["role", "content", "name", "extra"])] = _value(rng)
        elif action < 0.85:
            body = _value(rng)
        elif action < 0.9:
            body["seed"], body["temperature"] = FAULT_SEED, 1.0  # the injected fault: 500, alone
    text = json.dumps(body).encode() if rng.random() < 0.93 else json.dumps(body)[: rng.randint(0, 20)].encode()
    if rng.random() < 0.03:
        text = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    return text


def _grpc_request(rng: random.Random) -> pb.GenerateRequest:
    request = pb.GenerateRequest(max_tokens=rng.choice([1, 4, 8]))
    choice = rng.random()
    if choice < 0.6:
        request.prompt = rng.choice([PROMPT, "", "x", "ü" * 5, "word " * 400])
    elif choice < 0.8:
        request.prompt_token_ids.extend(rng.choice([[1, 2, 3], [2**31], [], [5] * 300]))
    else:
        request.messages.add(role=rng.choice(["user", "system", "wizard", ""]), content=rng.choice(["hi", ""]))
    for _ in range(rng.randint(0, 5)):
        field = rng.choice(["temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", "min_tokens",
                            "presence_penalty", "repetition_penalty", "logit_bias", "echo", "max_tokens", "model"])
        if field in ("temperature", "top_p", "presence_penalty", "repetition_penalty"):
            setattr(request, field, rng.choice([0.0, -1.0, 0.5, 1.0, 3.0, 1e-38, float("nan"), float("inf")]))
        elif field in ("top_k", "n", "logprobs", "min_tokens", "max_tokens"):
            setattr(request, field, rng.choice([0, 1, 3, 21, 99, 2**32 - 1]))
        elif field == "seed":
            request.seed = rng.choice([0, FAULT_SEED, 2**64 - 1])
            request.temperature = 1.0
        elif field == "stop":
            request.stop.extend(rng.choice([["\n"], [""], ["s"] * 20, ["y" * 400]]))
        elif field == "logit_bias":
            request.logit_bias[rng.choice([1, 10**6])] = rng.choice([1.0, -500.0, float("nan")])
        elif field == "echo":
            request.echo = True
        else:
            request.model = rng.choice(["tiny", "other"])
    return request


@pytest.fixture(scope="module")
def fuzz_server(faulty_engine_factory):
    engine = faulty_engine_factory(max_model_len=128, max_tokens=64, max_batch_size=8, max_n=4, max_waiting=64)
    srv, stop = start_server(engine)
    yield srv
    stop()


def test_fuzzing_never_fails_the_server_or_other_streams(fuzz_server, make_engine):
    server = fuzz_server
    expected = make_engine("ngram", k=0).generate([PROMPT], server.engine.default_params(max_tokens=24))[0].text
    stop = threading.Event()
    normal_runs, normal_failures = [0], []

    def normal_stream(kind: str):
        while not stop.is_set():
            try:
                if kind == "grpc":
                    text = "".join(m.text for m in server.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT,
                                                                                                  max_tokens=24)))
                else:
                    events = server.sse("/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "stream": True})
                    text = "".join(e["choices"][0]["text"] for e in events)
                if text != expected:
                    normal_failures.append(f"{kind}: {text!r}")
                normal_runs[0] += 1
            except Exception as error:  # any error of a normal stream fails the test
                normal_failures.append(f"{kind}: {error!r}")

    normals = [threading.Thread(target=normal_stream, args=(k,)) for k in ("http", "grpc", "http")]
    for t in normals:
        t.start()
    rng = random.Random(20261123)
    bad_http, bad_grpc, faults, served = [], [], 0, 0
    try:
        for i in range(HTTP_CASES):
            raw = _mutate(rng, chat=bool(i % 2))
            status, body = server.post("/v1/chat/completions" if i % 2 else "/v1/completions", None, raw=raw)
            if status >= 500:
                if status == 500 and body.get("error", {}).get("type") == "internal_error" and \
                        f'"seed": {FAULT_SEED}' in raw.decode(errors="replace"):
                    faults += 1
                else:
                    bad_http.append((status, raw[:200], body))
            elif status != 200:
                assert isinstance(body.get("error"), dict) and body["error"].get("message"), (status, body)
            else:
                served += 1
        for _ in range(GRPC_CASES):
            request = _grpc_request(rng)
            try:
                server.stub.Generate(request, timeout=60)
                served += 1
            except grpc.RpcError as error:
                allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
                if error.code() == grpc.StatusCode.INTERNAL and request.seed == FAULT_SEED:
                    faults += 1
                elif error.code() not in allowed:
                    bad_grpc.append((error.code(), error.details(), request))
    finally:
        stop.set()
        for t in normals:
            t.join()
    assert not bad_http, bad_http[:3]
    assert not bad_grpc, bad_grpc[:3]
    assert not normal_failures, normal_failures[:3]
    assert normal_runs[0] >= 3 and faults >= 1
    assert served >= 50  # the fuzz reaches generation, not only validation
    assert server.wait_idle() == 0
    finals = full_batch_runs_at_once(server, max_tokens=24)
    assert all(f.full_text == expected for f in finals)
