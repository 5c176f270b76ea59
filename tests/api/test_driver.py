"""The driver and the replica around it: a failing step reaches every caller and the driver goes on;
Serve's health check sees a dead driver; overload is 429; the chat template is applied."""

import threading

import pytest
import yaml

from cluster.serving.driver import EngineDriver, last_delta
from deployments.api import chat_prompt
from deployments.server import SpecDecServer
from cluster.engine import SpecEngine
from tests.api.conftest import PROMPT, SlowDrafter, start_server


def test_a_failing_step_fails_every_request_in_flight_and_the_driver_goes_on(make_engine):
    engine = make_engine("ngram", k=2, max_tokens=200, max_model_len=256)
    driver = EngineDriver(engine)
    try:
        step, calls = engine.step, [0]

        def broken_step():
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("a bug in the loop")
            return step()

        engine.step = broken_step
        streams = driver.stream_many([(PROMPT, engine.default_params(max_tokens=150))] * 3)
        finals = [last_delta(s) for s in streams]
        assert all(f.finish_reason == "error" for f in finals)
        assert engine.target.backend.cache.occupied == 0 and not engine.has_unfinished()
        assert last_delta(driver.stream(PROMPT, engine.default_params(max_tokens=5))).finish_reason == "length"
    finally:
        driver.close()


def test_health_check_sees_a_dead_driver(tiny_models, tmp_path):
    config = tmp_path / "engine.yaml"
    config.write_text(yaml.safe_dump({"target": {"path": str(tiny_models["target"]), "dtype": "float32"}, "drafter": {"kind": "ngram"},
                                      "speculation": {"k": 2}}))
    server = SpecDecServer(str(config), grpc_port=0, engine="local")
    try:
        server.check_health()
        assert server.drain(timeout_s=1) == 0
        server.driver.close()
        with pytest.raises(RuntimeError, match="driver"):
            server.check_health()
    finally:
        server.shutdown()


def test_overload_is_429(make_engine):
    base = make_engine("ngram", k=2, max_batch_size=1, max_waiting=1, max_tokens=400, max_model_len=512)
    engine = SpecEngine(base.config, tokenizer=base.tokenizer, target=base.target, drafter=SlowDrafter(0.02))
    server, stop = start_server(engine)
    try:
        long = engine.default_params(max_tokens=400, logit_bias=tuple((e, -100.0) for e in engine.eos_ids))
        running = server.driver.stream(PROMPT, long)
        next(running)  # it holds the only slot
        waiting = server.driver.stream(PROMPT, long)  # and this one the only place in the queue
        status, body = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        for s in (running, waiting):
            s.close()
        assert server.wait_idle() == 0
    finally:
        stop()


def test_chat_template_is_applied(make_engine):
    tokenizer = make_engine("ngram", k=0).tokenizer
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert chat_prompt(tokenizer, messages) == "system: Be brief.\nuser: hi\nassistant:"  # no template: plain
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        assert chat_prompt(tokenizer, messages) == "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"
    finally:
        tokenizer.chat_template = None
