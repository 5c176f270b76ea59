"""The embedded server as a user starts it (issue 8, items 2 and 8): started in the background by a
non-interactive shell (SIGINT ignored), it listens on loopback only, on the ports it is given; SIGINT
drains it (new requests refused, the one in flight finishes), it exits 0, and no Ray process is left."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest
import yaml

from tests.api.conftest import PROMPT, free_port
from tests.api.test_hardening import listening

pytestmark = pytest.mark.slow


def _post(url: str, body: dict, timeout: float = 60):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def test_run_local_binds_loopback_and_drains_on_sigint(tiny_models, tmp_path):
    config = tmp_path / "engine.yaml"
    config.write_text(yaml.safe_dump({
        "target": {"path": str(tiny_models["target"]), "dtype": "float32"},
        "drafter": {"kind": "model", "model": {"path": str(tiny_models["draft_noisy"]), "dtype": "float32"}},
        "speculation": {"k": 3, "adaptive": False},
        "limits": {"max_batch_size": 4, "max_model_len": 512, "max_tokens": 400},
        "cluster": {"target_pool": {"num_cpus": 0, "torch_threads": 1, "resources": {"target_node": 1}},
                    "draft_pool": {"num_cpus": 0, "torch_threads": 1, "resources": {"draft_node": 1}}},
    }))
    http_port, grpc_port = free_port(), free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "deployments.run_local", "--config", str(config), "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--drain-timeout", "60"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `cmd &` in a script does
        env=os.environ | {"RAY_DEDUP_LOGS": "0"},
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.time() + 180
        while "serving:" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        for port in (http_port, grpc_port):  # on the ports given, on loopback only
            addresses = listening(port)
            assert addresses and all(a.is_loopback for a in addresses), (port, addresses)
        with _post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3}) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 3
        processes = psutil.Process(server.pid).children(recursive=True) + [psutil.Process(server.pid)]
        assert any("raylet" in p.name() or "gcs_server" in p.name() for p in processes)

        in_flight = {}

        def long_request():
            with _post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 400, "stream": True,
                                                  "stop": ["never-generated"]}) as response:
                events = [json.loads(line[6:]) for line in response if line.startswith(b"data: {")]
            in_flight["finish"] = events[-1]["choices"][0]["finish_reason"]
            in_flight["chunks"] = len(events)

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(0.5)  # it is running
        server.send_signal(signal.SIGINT)
        refused = None
        for _ in range(50):  # while draining, new requests are refused
            try:
                _post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3}, timeout=10).close()
            except urllib.error.HTTPError as error:
                refused = error.code
                break
            except OSError:
                refused = "closed"
                break
            time.sleep(0.1)
        thread.join(timeout=120)
        assert server.wait(timeout=120) == 0
        assert refused in (503, "closed")
        assert in_flight.get("finish") == "length", in_flight  # the request in flight was allowed to finish
        time.sleep(2)
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
