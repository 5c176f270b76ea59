"""The whole application on Ray Serve, called with the `openai` client and a generated gRPC stub."""

import socket
from pathlib import Path

import grpc
import json
import urllib.error
import urllib.request
import pytest
import ray
import yaml
from openai import OpenAI
from ray import serve

from cluster.types import SamplingParams
from deployments.autoscaling import IN_FLIGHT
from deployments.builders import build_app
from specdec.v1 import generation_pb2 as pb
from specdec.v1 import generation_pb2_grpc as pb_grpc

PROMPT = "class Parser:\n    def __init__(self, text):\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    config = {
        "target": {"path": str(tiny_models["target"]), "dtype": "float32"},
        "drafter": {"kind": "model", "model": {"path": str(tiny_models["draft_noisy"]), "dtype": "float32"}},
        "speculation": {"k": 3, "adaptive": False},
        "sampling": {"max_tokens": 16},
        "limits": {"max_batch_size": 4, "max_model_len": 128, "max_tokens": 64},
        "cluster": {"target_pool": {"num_cpus": 0, "torch_threads": 1, "resources": {"target_node": 1}},
                    "draft_pool": {"num_cpus": 0, "torch_threads": 1, "resources": {"draft_node": 1}},
                    "shared_pools": {"enabled": True, "name": "serve-test-pools", "idle_exit_s": 0}},
    }
    path = tmp_path_factory.mktemp("serve") / "engine.yaml"
    path.write_text(yaml.safe_dump(config))
    http_port, grpc_port = _free_port(), _free_port()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, resources={"target_node": 2, "draft_node": 2, "ingress": 2}, include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    app_args = yaml.safe_load(Path("deployments/configs/serve.yaml").read_text())["applications"][0]["args"]
    # two ingress replicas (routers) on one shared target pool and one shared draft pool
    app_args |= {"config": str(path), "grpc_port": grpc_port, "autoscaling_config": {"min_replicas": 2,
                                                                                     "max_replicas": 2}}
    serve.run(build_app(app_args), name="specdec")
    yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
    serve.shutdown()
    manager = ray.get_actor("serve-test-pools", namespace="specdec")
    ray.get(manager.shutdown.remote())
    ray.kill(manager)
    ray.shutdown()


@pytest.fixture(scope="module")
def expected(make_engine):
    engine = make_engine("ngram", k=0)
    return engine.generate([PROMPT], SamplingParams(max_tokens=16))[0]


@pytest.fixture(scope="module")
def client(app):
    return OpenAI(base_url=app["http"] + "/v1", api_key="unused")


def test_openai_completion_equals_target_only(client, expected):
    response = client.completions.create(model="target", prompt=PROMPT, max_tokens=16, temperature=0)
    assert response.choices[0].text == expected.text
    assert response.usage.completion_tokens == len(expected.token_ids)


def test_openai_streaming_completion(client, expected):
    chunks = list(client.completions.create(model="target", prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_openai_chat_and_chat_streaming(client):
    messages = [{"role": "user", "content": "write a parser"}]
    full = client.chat.completions.create(model="target", messages=messages, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    streamed = client.chat.completions.create(model="target", messages=messages, max_tokens=12, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
    assert full.usage.completion_tokens == 12


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_and_http_errors(client, app):
    assert [m.id for m in client.models.list().data] == ["target"]
    url = app["http"] + "/v1/completions"
    status, body = _post(url, {"prompt": PROMPT, "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = _post(url, {"prompt": PROMPT, "top_p": 2})
    assert status == 400 and body["error"]["param"] == "top_p"
    status, body = _post(url, {"prompt": "", "max_tokens": 4})
    assert status == 400 and body["error"]["param"] == "prompt"
    status, _ = _post(url, {"model": "nope", "prompt": PROMPT})
    assert status == 404
    status, body = _post(url, {"prompt": PROMPT, "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_grpc_on_the_serve_replica(app, expected):
    with grpc.insecure_channel(app["grpc"]) as channel:
        stub = pb_grpc.GenerationStub(channel)
        response = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=16, include_stats=True))
        assert response.text == expected.text
        streamed = "".join(m.text for m in stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_tokens=16)))
        assert streamed == expected.text


def test_two_replicas_share_one_target_pool_and_one_draft_pool(app, client, expected):
    manager = ray.get_actor("serve-test-pools", namespace="specdec")
    status = ray.get(manager.status.remote())
    assert len(status["routers"]) == 2 and status["sizes"] == {"target": 1, "draft": 1}
    for _ in range(6):  # requests land on both replicas; each verifies on the one shared target actor
        assert client.completions.create(model="target", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text \
            == expected.text
    handles = ray.get(manager.handles.remote())
    assert len(ray.get(handles["target"]["target-0"].call_log.remote())) > 0


def test_replicas_report_grpc_requests_to_the_autoscaler(app):
    """A gRPC stream bypasses Serve's proxy; the replica that serves it counts it in the custom metric
    the ingress policy scales on."""
    handle = serve.get_deployment_handle("SpecDecServer", "specdec")
    with grpc.insecure_channel(app["grpc"]) as channel:
        stub = pb_grpc.GenerationStub(channel)
        stream = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_tokens=60, min_tokens=60))
        next(stream)
        seen = max(handle.record_autoscaling_stats.remote().result()[IN_FLIGHT] for _ in range(8))
        stream.cancel()
    assert seen >= 1
