"""Every OpenAI parameter is honoured or refused by name, on HTTP and gRPC (issue 8, item 3)."""

import math

import grpc
import pytest
from openai import OpenAI

from cluster.types import SamplingParams
from specdec.v1 import generation_pb2 as pb
from tests.api.conftest import PROMPT

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "write a parser"}]


@pytest.fixture(scope="module")
def target_only(make_engine):
    return make_engine("ngram", k=0, max_model_len=128)


def _text(server, body, path=COMPLETIONS):
    status, out = server.post(path, body)
    assert status == 200, out
    return out


# --- honoured -------------------------------------------------------------------------------------
def test_max_completion_tokens_limits_chat_output(server):
    client = OpenAI(base_url=server.http + "/v1", api_key="x")
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=5, temperature=0)
    assert out.usage.completion_tokens == 5
    status, body = server.post(CHAT, {"messages": MESSAGES, "max_tokens": 4, "max_completion_tokens": 5})
    assert status == 400 and body["error"]["param"] == "max_completion_tokens"


def test_penalties_and_logit_bias_change_output_as_in_the_engine(server, target_only):
    knobs = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3,
             "logit_bias": {"5": 5.0, "17": -100}}
    expected = target_only.generate([PROMPT], SamplingParams(
        max_tokens=20, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3,
        logit_bias=((5, 5.0), (17, -100.0))))[0].text
    plain = _text(server, {"prompt": PROMPT, "max_tokens": 20})["choices"][0]["text"]
    got = _text(server, {"prompt": PROMPT, "max_tokens": 20} | knobs)["choices"][0]["text"]
    assert got == expected != plain
    response = server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=20, presence_penalty=1.5,
                                                       frequency_penalty=0.5, repetition_penalty=1.3,
                                                       logit_bias={5: 5.0, 17: -100}))
    assert response.text == expected


def test_min_tokens_holds_off_eos(server, target_only):
    eos = target_only.tokenizer.eos_token_id
    bias = {str(eos): 30}  # the target now wants to stop at once
    assert _text(server, {"prompt": "x", "max_tokens": 60, "logit_bias": bias})["usage"]["completion_tokens"] == 1
    body = _text(server, {"prompt": "x", "max_tokens": 60, "min_tokens": 9, "logit_bias": bias})
    assert body["usage"]["completion_tokens"] == 10 and body["choices"][0]["finish_reason"] == "stop"
    response = server.stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=60, min_tokens=9, logit_bias={eos: 30}))
    assert response.completion_tokens == 10 and response.finish_reason == "eos"


def test_stop_as_a_string_or_a_list(server, target_only):
    full = target_only.generate([PROMPT], SamplingParams(max_tokens=30))[0].text
    stop = full[6:9]
    for value in (stop, [stop, "never-there"]):
        body = _text(server, {"prompt": PROMPT, "max_tokens": 30, "stop": value})
        assert body["choices"][0]["text"] == full[: full.index(stop)]
        assert body["choices"][0]["finish_reason"] == "stop"


def test_n_samples_each_with_its_own_seed_and_replayable(server):
    body = _text(server, {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "n": 3})
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["seed"] for c in choices}) == 3 and len({c["text"] for c in choices}) > 1
    again = _text(server, {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": choices[0]["seed"]})
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in choices]  # one seed replays all n
    alone = _text(server, {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": choices[2]["seed"]})
    assert alone["choices"][0]["text"] == choices[2]["text"]  # and each choice's own seed replays it
    response = server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=12, temperature=1.0, n=3,
                                                       seed=choices[0]["seed"]))
    assert [c.text for c in response.choices] == [c["text"] for c in choices]
    streamed = {}
    for message in server.stub.GenerateStream(pb.GenerateRequest(prompt=PROMPT, max_tokens=12, temperature=1.0,
                                                                 n=3, seed=choices[0]["seed"])):
        streamed[message.index] = streamed.get(message.index, "") + message.text
    assert [streamed[i] for i in range(3)] == [c["text"] for c in choices]


def test_unseeded_sampling_differs_and_reports_the_seed(server):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0}
    first, second = (_text(server, body)["choices"][0] for _ in range(2))
    assert first["seed"] != second["seed"] and first["text"] != second["text"]
    replay = _text(server, body | {"seed": first["seed"]})["choices"][0]
    assert replay["text"] == first["text"]
    response = server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=16, temperature=1.0))
    again = server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=16, temperature=1.0, seed=response.seed))
    assert again.text == response.text


def test_logprobs_on_completions_chat_and_grpc(server):
    body = _text(server, {"prompt": PROMPT, "max_tokens": 6, "logprobs": 2})
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) <= 2 for t in lp["top_logprobs"])
    greedy_top = [max(t.values()) for t in lp["top_logprobs"]]
    assert lp["token_logprobs"] == pytest.approx(greedy_top)  # greedy emits the most likely token
    chat = _text(server, {"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 3}, CHAT)
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)
    response = server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=6, logprobs=2))
    assert [e.logprob for e in response.logprobs] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert all(math.isfinite(e.logprob) and len(e.top_logprobs) == 2 for e in response.logprobs)


def test_echo_prompt_lists_and_token_ids(server, target_only):
    expected = target_only.generate([PROMPT], SamplingParams(max_tokens=8))[0]
    body = _text(server, {"prompt": PROMPT, "max_tokens": 8, "echo": True})
    assert body["choices"][0]["text"] == PROMPT + expected.text
    ids = target_only.tokenizer.encode(PROMPT)
    for prompt in (ids, [ids]):
        assert _text(server, {"prompt": prompt, "max_tokens": 8})["choices"][0]["text"] == expected.text
    two = _text(server, {"prompt": [PROMPT, "import os\n"], "max_tokens": 8})
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["choices"][0]["text"] == expected.text
    by_ids = server.stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=8, echo=True))
    assert by_ids.text == target_only.tokenizer.decode(ids) + expected.text


def test_stream_options_include_usage(server):
    events = server.sse(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 6, "stream": True,
                                      "stream_options": {"include_usage": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    assert all("usage" not in e for e in events[:-1])
    plain = server.sse(COMPLETIONS, {"prompt": PROMPT, "max_tokens": 6, "stream": True})
    assert all("usage" not in e for e in plain)


def test_content_parts_and_chat_over_grpc(server):
    text = _text(server, {"messages": MESSAGES, "max_tokens": 8}, CHAT)["choices"][0]["message"]["content"]
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"][:3]},
                                              {"type": "text", "text": m["content"][3:]}]} for m in MESSAGES]
    assert _text(server, {"messages": parts, "max_tokens": 8}, CHAT)["choices"][0]["message"]["content"] == text
    response = server.stub.Generate(pb.GenerateRequest(
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES], max_tokens=8))
    assert response.text == text


# --- refused, by name -----------------------------------------------------------------------------
@pytest.mark.parametrize("path, extra, param", [
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"tool_choice": "auto"}, "tool_choice"),
    (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"echo": True}, "echo"),
    (CHAT, {"banana": 1}, "banana"),
    (COMPLETIONS, {"best_of": 3, "n": 2}, "best_of"),
    (COMPLETIONS, {"best_of": 1, "n": 2}, "best_of"),
    (COMPLETIONS, {"suffix": "x"}, "suffix"),
    (COMPLETIONS, {"n": 99}, "n"),
    (COMPLETIONS, {"echo": True, "logprobs": 1}, "echo"),
    (COMPLETIONS, {"stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"logprobs": 50}, "logprobs"),
    (COMPLETIONS, {"messages": MESSAGES}, "messages"),
])
def test_unimplemented_parameters_are_refused_by_name(server, path, extra, param):
    base = {"messages": MESSAGES} if path == CHAT else {"prompt": PROMPT}
    status, body = server.post(path, base | {"max_tokens": 4} | extra)
    assert status == 400 and body["error"]["param"] == param, body


@pytest.mark.parametrize("fields, param", [
    (dict(messages=[pb.ChatMessage(role="wizard", content="hi")]), "messages[0].role"),
    (dict(prompt=PROMPT, messages=[pb.ChatMessage(role="user", content="hi")]), "prompt"),
    (dict(prompt=PROMPT, n=99), "n"),
    (dict(prompt=PROMPT, logprobs=50), "logprobs"),
    (dict(prompt=PROMPT, echo=True, logprobs=1), "echo"),
    (dict(prompt=PROMPT, repetition_penalty=0.0), "repetition_penalty"),
    (dict(prompt=PROMPT, presence_penalty=3.0), "presence_penalty"),
    (dict(prompt=PROMPT, logit_bias={10**6: 1.0}), "logit_bias"),
    (dict(prompt=PROMPT, min_tokens=99, max_tokens=4), "min_tokens"),
    (dict(prompt_token_ids=[10**6]), "prompt"),
])
def test_grpc_refuses_what_it_cannot_honour(server, fields, param):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(pb.GenerateRequest(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(param)
