"""Issue 8, item by item: one bad request never touches another; client mistakes are 400 with a JSON
body; tiny temperatures are greedy; the step thread only steps; /metrics by value; safe defaults."""

import http.client
import inspect
import json
import ipaddress
import threading
import time

import grpc
import pytest
import yaml

from deployments.server import SpecDecServer
from specdec.v1 import generation_pb2 as pb
from tests.api.conftest import FAULT_SEED, PROMPT, full_batch_runs_at_once

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def reference(make_engine):
    """Target-only greedy text for PROMPT, by max_tokens."""
    engine = make_engine("ngram", k=0)
    return lambda n: engine.generate([PROMPT], engine.default_params(max_tokens=n))[0]


# --- 1. one request cannot fail the others ---------------------------------------------------------
def test_out_of_range_seed_is_refused_and_huge_top_k_means_off(server, reference):
    status, body = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 4, "temperature": 1, "seed": 2**64})
    assert status == 400 and body["error"]["param"] == "seed"
    with pytest.raises(grpc.RpcError) as err:  # gRPC's uint64 cannot carry 2**64; a negative top_p can't pass either
        server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=4, top_p=-1.0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("top_p")
    status, body = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "top_k": 2**63})
    assert status == 200 and body["choices"][0]["text"] == reference(6).text
    top = server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=4, temperature=1.0, top_k=2**32 - 1,
                                                  seed=2**64 - 1))
    assert top.completion_tokens == 4 and top.seed == 2**64 - 1
    assert server.wait_idle() == 0


def test_a_request_failing_inside_the_server_fails_alone(server, reference):
    expected = reference(40)
    results, errors = {}, {}

    def normal(i):
        results[i] = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 40})

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    status, body = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 30, "temperature": 1.0, "seed": FAULT_SEED})
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=30, temperature=1.0, seed=FAULT_SEED))
    for t in threads:
        t.join()
    assert status == 500 and body["error"]["type"] == "internal_error" and "request id" in body["error"]["message"]
    assert err.value.code() == grpc.StatusCode.INTERNAL and "request id" in err.value.details()
    for leaked in ("secret", "10.0.0.7", "Traceback", ".py"):  # paths, addresses and tracebacks stay in the log
        assert leaked not in str(body) and leaked not in err.value.details()
    assert all(s == 200 and b["choices"][0]["text"] == expected.text for s, b in results.values())
    assert server.wait_idle() == 0  # its slot and sequences were freed
    assert server.engine.metrics.value("specdec_request_errors_total") >= 2
    full_batch_runs_at_once(server)


# --- 2. safe defaults -----------------------------------------------------------------------------
def listening(port: int) -> set:
    """Addresses listening on `port`, read from /proc/net/tcp{,6} (IPv4-mapped IPv6 shown as IPv4)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if int(hex_port, 16) != port or state != "0A":  # LISTEN
                    continue
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little endian
                ip = ipaddress.ip_address(raw)
                found.add(ip.ipv4_mapped or ip if ip.version == 6 else ip)
    return found


def test_grpc_listens_on_loopback_only_by_default(server):
    addresses = listening(server.grpc_port)
    assert addresses and all(a.is_loopback for a in addresses), addresses
    assert inspect.signature(SpecDecServer.__init__).parameters["grpc_host"].default == "127.0.0.1"
    serve_yaml = yaml.safe_load(open("deployments/configs/serve.yaml"))
    assert serve_yaml["http_options"]["host"] == "127.0.0.1"
    assert serve_yaml["applications"][0]["args"]["grpc_host"] == "127.0.0.1"


def test_a_public_address_without_a_key_is_warned_about(caplog):
    from deployments.grpc_ingress import warn_if_exposed

    warn_if_exposed("127.0.0.1", None, "gRPC")
    warn_if_exposed("0.0.0.0", "key", "gRPC")
    assert "without an API key" not in caplog.text
    warn_if_exposed("0.0.0.0", None, "gRPC")
    assert "without an API key" in caplog.text


# --- 4. client mistakes are 400 with a JSON body ----------------------------------------------------
@pytest.mark.parametrize("path, raw, param", [
    (COMPLETIONS, b"[1, 2]", "body"),
    (COMPLETIONS, b"null", "body"),
    (COMPLETIONS, b'"hello"', "body"),
    (COMPLETIONS, b"{not json", None),
    (COMPLETIONS, b'{"prompt": "x", "stop": 5}', "stop"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": "4"}', "max_tokens"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": true}', "temperature"),
    (COMPLETIONS, b'{"prompt": {"a": 1}}', "prompt"),
    (COMPLETIONS, b'{"prompt": "x", "logit_bias": {"abc": 1}}', "logit_bias"),
    (COMPLETIONS, b'{"prompt": "x", "logit_bias": {"5": 1000}}', "logit_bias"),
    (CHAT, b'{"messages": [{"content": "hi"}]}', "messages[0].role"),
    (CHAT, b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
    (CHAT, b'{"messages": [{"role": "user"}]}', "messages[0].content"),
    (CHAT, b'{"messages": "hi"}', "messages"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages[0].content[0]"),
])
def test_malformed_bodies_are_400_with_a_json_error(server, path, raw, param):
    status, body = server.post(path, None, raw=raw)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param


def test_body_over_the_limit_is_413(server):
    """Refused from the declared length, before a byte of the body is read (so no body is sent here)."""
    limit = server.engine.config.limits.max_body_bytes
    connection = http.client.HTTPConnection(server.http.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", COMPLETIONS)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(limit + 1))
    connection.endheaders()
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 413 and body["error"]["type"] == "request_too_large"


# --- 5. tiny temperatures are greedy ----------------------------------------------------------------
def test_tiny_temperature_is_greedy(server, reference):
    expected = reference(16).text
    status, body = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 16, "temperature": 1e-38})
    assert status == 200 and body["choices"][0]["text"] == expected
    response = server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=16, temperature=1e-38))
    assert response.text == expected


# --- 6. the step thread only steps --------------------------------------------------------------------
class _Recording:
    """Wraps the tokenizer: records which threads encode and decode, and makes one marked prompt slow."""

    def __init__(self, tokenizer, slow_marker: str, delay_s: float, on_slow=None):
        self._tok, self._marker, self._delay, self._on_slow = tokenizer, slow_marker, delay_s, on_slow
        self.threads: set[str] = set()
        self.encoded: list[int] = []

    def encode(self, text, *args, **kwargs):
        self.threads.add(threading.current_thread().name)
        self.encoded.append(len(text))
        if self._marker in text:
            self._on_slow()
        return self._tok.encode(text, *args, **kwargs)

    def decode(self, ids, *args, **kwargs):
        self.threads.add(threading.current_thread().name)
        return self._tok.decode(ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_tokenising_and_detokenising_run_outside_the_step_thread(server):
    engine = server.engine
    steps_during = []

    def slow_encode():
        before = engine.timings.steps
        time.sleep(1.0)  # a 1 s tokenisation (a huge prompt): the other stream must keep stepping
        steps_during.append(engine.timings.steps - before)

    recording = _Recording(engine.tokenizer, "SLOW-PROMPT", 1.0, slow_encode)
    original_builder_tok, original_tok = engine.requests.tokenizer, engine.tokenizer
    engine.requests.tokenizer = engine.tokenizer = recording
    try:
        started = engine.timings.steps
        long_stream = threading.Thread(target=lambda: server.post(COMPLETIONS, {
            "prompt": PROMPT, "max_tokens": 60, "stop": ["never-there", "\n\n\n\n"]}))
        long_stream.start()
        deadline = time.time() + 10
        while engine.timings.steps == started:  # the stream is decoding (a fixed wait raced fast machines)
            assert time.time() < deadline, "the long stream never started"
            time.sleep(0.001)
        status, _ = server.post(COMPLETIONS, {"prompt": "SLOW-PROMPT " + PROMPT, "max_tokens": 4})
        long_stream.join()
    finally:
        engine.requests.tokenizer, engine.tokenizer = original_builder_tok, original_tok
    assert status == 200
    assert steps_during and steps_during[0] >= 3, "the other stream stalled while a prompt was tokenised"
    assert "engine-driver" not in recording.threads  # the step thread never encodes or decodes


def test_prompt_length_is_checked_by_characters_before_tokenising(server):
    engine = server.engine
    recording = _Recording(engine.tokenizer, "never", 0, None)
    original = engine.requests.tokenizer
    engine.requests.tokenizer = recording
    try:
        status, body = server.post(COMPLETIONS, {"prompt": "word " * 100_000, "max_tokens": 4})
    finally:
        engine.requests.tokenizer = original
    assert status == 400 and body["error"]["param"] == "prompt" and "characters" in body["error"]["message"]
    assert recording.encoded == []  # refused without tokenising


@pytest.mark.parametrize("stop", [["s"] * 17, ["x" * 300]])
def test_stop_strings_are_bounded(server, stop):
    status, body = server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 4, "stop": stop})
    assert status == 400 and body["error"]["param"] == "stop"
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=4, stop=stop))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("stop")


# --- 7. /metrics on the HTTP port, by value ----------------------------------------------------------
def _sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_endpoint_reports_a_known_workload(server):
    server.wait_idle()
    _, before = server.get("/metrics")
    for _ in range(3):
        assert server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 5})[0] == 200
    assert server.post(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 0})[0] == 400
    status, after = server.get("/metrics")
    assert status == 200

    def delta(name, **labels):
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("specdec_requests_total", finish_reason="length") == 3
    assert delta("specdec_generated_tokens_total") == 15
    assert delta("specdec_time_to_first_token_seconds_count") == 3
    assert delta("specdec_time_per_output_token_seconds_count") == 3
    assert delta("specdec_api_requests_total", protocol="http", route="/v1/completions", status="200") == 3
    assert delta("specdec_api_requests_total", protocol="http", route="/v1/completions", status="400") == 1
    drafted = _sample(after, "specdec_draft_tokens_total", drafter="model")
    accepted = _sample(after, "specdec_accepted_tokens_total", drafter="model")
    verifies = _sample(after, "specdec_verify_passes_total", drafter="model")
    assert drafted > 0
    assert _sample(after, "specdec_acceptance_rate", drafter="model") == pytest.approx(accepted / drafted)
    assert _sample(after, "specdec_mean_accepted_length", drafter="model") == pytest.approx((accepted + verifies) / verifies)
    assert 0 < _sample(after, "specdec_target_busy_fraction") <= 1
    assert "specdec_queue_depth" in after
