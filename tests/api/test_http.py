"""The OpenAI HTTP app under a real uvicorn server: API key, and a dropped stream freeing caches."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import uvicorn

from cluster.engine import SpecEngine
from cluster.serving.driver import EngineDriver
from deployments import openai_api
from tests.api.conftest import SlowDrafter

PROMPT = "class Parser:\n    def __init__(self, text):\n"


@pytest.fixture(scope="module")
def http(make_engine):
    base = make_engine("ngram", k=3, max_tokens=200)
    engine = SpecEngine(base.config, model=base.target.backend.model, tokenizer=base.tokenizer, drafter=SlowDrafter(0.01))
    driver = EngineDriver(engine)
    openai_api.configure(driver, "tiny", api_key="s3cret")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(openai_api.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", driver
    server.should_exit = True
    thread.join(timeout=10)
    driver.close()
    openai_api.configure(None, "", None)


def _post(url, body, key=None):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    return urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), headers))


def test_api_key_required(http):
    base, _ = http
    for key in (None, "wrong"):
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3}, key)
        assert err.value.code == 401
    with _post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3}, "s3cret") as response:
        assert json.loads(response.read())["usage"]["completion_tokens"] == 3
    with urllib.request.urlopen(base + "/healthz") as response:  # probes need no key
        assert response.status == 200


def test_dropped_stream_stops_generation_and_frees_caches(http):
    base, driver = http
    body = {"prompt": PROMPT, "max_tokens": 200, "stream": True, "stop": ["never-generated"]}
    steps = lambda: driver.call(lambda e: e.stats.steps)  # noqa: E731
    before = steps()
    with _post(base + "/v1/completions", body, "s3cret") as response:
        full = sum(1 for line in response if line.startswith(b"data: {"))
    full_steps = steps() - before
    assert full > 20
    before = steps()
    response = _post(base + "/v1/completions", body, "s3cret")
    assert response.readline().startswith(b"data: ")
    response.close()  # the client goes away mid-stream
    deadline = time.time() + 10
    while driver.call(lambda e: len(e.running) + e.target.backend.cache.occupied) and time.time() < deadline:
        time.sleep(0.05)
    assert driver.call(lambda e: len(e.running) + e.target.backend.cache.occupied + e.drafter.num_sequences) == 0
    assert steps() - before < full_steps / 2  # cancelled, not run to the end
