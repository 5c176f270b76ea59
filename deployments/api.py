"""What the front doors share: a protocol-neutral request, OpenAI JSON parsed into it with every field
honoured or refused by name, chat formatting, and the fan-out of prompts x n samples into streams.

Each error is an InvalidRequestError whose `field` names the parameter; front doors turn it into
400 / INVALID_ARGUMENT. Nothing a client sends is silently ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass

from cluster.errors import InvalidRequestError
from cluster.serving.driver import DeltaStream, EngineDriver
from cluster.types import MAX_LOGPROBS, MAX_SEED, SamplingParams

log = logging.getLogger(__name__)

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Parameters we take, per endpoint (top_k, min_tokens, repetition_penalty are extensions, as in vLLM).
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "top_k", "min_tokens",
           "repetition_penalty"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
# OpenAI parameters we do not implement: refused by name, never ignored.
REFUSED = {
    "suffix": "insertion (suffix) is not supported",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "response_format": "structured output (response_format) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning models are not served",
    "web_search_options": "web search is not supported",
    "service_tier": "service tiers are not supported",
    "store": "storing completions is not supported",
    "metadata": "storing completions is not supported",
}


@dataclass
class ApiRequest:
    prompts: list  # each a string or a list of token ids
    params: SamplingParams
    n: int = 1
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    chat: bool = False
    user: str | None = None


@dataclass
class Choice:
    index: int  # prompt_index * n + sample
    prompt_index: int
    stream: DeltaStream
    echo_text: str = ""  # the prompt's text, when echo is on


def parse_openai(body, chat: bool, driver: EngineDriver) -> ApiRequest:
    """An OpenAI /v1/completions or /v1/chat/completions body -> ApiRequest, or InvalidRequestError."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body", f"must be a JSON object, got {_json_type(body)}")
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for key in body:
        if key in REFUSED:
            raise InvalidRequestError(key, REFUSED[key])
        if key not in allowed:
            if key in COMPLETION_FIELDS | CHAT_FIELDS:
                raise InvalidRequestError(key, f"is not a parameter of {'chat' if chat else 'text'} completions")
            raise InvalidRequestError(key, "unknown parameter")
    get = {k: v for k, v in body.items() if v is not None}  # null means unset, as in OpenAI's API
    overrides: dict = {}
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if key in get:
            overrides[key] = _number(key, get[key])
    for key in ("top_k", "min_tokens", "seed"):
        if key in get:
            overrides[key] = _integer(key, get[key])
    if "seed" in overrides and overrides["seed"] < 0:  # OpenAI seeds may be negative: fold into our range
        overrides["seed"] %= MAX_SEED + 1
    max_tokens = _integer("max_tokens", get["max_tokens"]) if "max_tokens" in get else None
    if chat and "max_completion_tokens" in get:
        mct = _integer("max_completion_tokens", get["max_completion_tokens"])
        if max_tokens is not None and max_tokens != mct:
            raise InvalidRequestError("max_completion_tokens", "differs from max_tokens; send one")
        max_tokens = mct
    if max_tokens is not None:
        overrides["max_tokens"] = max_tokens
    if "stop" in get:
        stop = get["stop"]
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or any(not isinstance(s, str) for s in stops):
            raise InvalidRequestError("stop", "must be a string or a list of strings")
        overrides["stop"] = tuple(stops)
    if "logit_bias" in get:
        overrides["logit_bias"] = _logit_bias(get["logit_bias"])
    overrides["logprobs"] = _logprobs(get, chat)
    n = _integer("n", get.get("n", 1))
    if not 1 <= n <= driver.limits.max_n:
        raise InvalidRequestError("n", f"must be in [1, {driver.limits.max_n}], got {n}")
    if "best_of" in get:
        best_of = _integer("best_of", get["best_of"])
        if best_of < n:
            raise InvalidRequestError("best_of", f"must be >= n ({n})")
        if best_of > n:
            raise InvalidRequestError("best_of", "best_of > n (server-side ranking) is not supported")
    stream = _boolean("stream", get.get("stream", False))
    include_usage = False
    if "stream_options" in get:
        options = get["stream_options"]
        if not stream:
            raise InvalidRequestError("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise InvalidRequestError("stream_options", "must be an object with only include_usage")
        include_usage = _boolean("stream_options.include_usage", options.get("include_usage", False))
    echo = _boolean("echo", get.get("echo", False))
    if echo and overrides["logprobs"] is not None:
        raise InvalidRequestError("echo", "echo with logprobs (prompt logprobs) is not supported")
    user = get.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequestError("user", "must be a string")
    if chat:
        prompts = [chat_prompt(driver.tokenizer, get.get("messages"))]
    else:
        if "prompt" not in get:
            raise InvalidRequestError("prompt", "is required")
        prompts = _prompts(get["prompt"])
    if len(prompts) * n > driver.limits.max_n:
        raise InvalidRequestError("n", f"prompts x n = {len(prompts) * n} exceeds {driver.limits.max_n}")
    try:
        params = driver.default_params(**overrides)
    except TypeError as e:  # defensive: an override key SamplingParams does not have
        raise InvalidRequestError("body", str(e)) from None
    return ApiRequest(prompts, params, n, echo, stream, include_usage, chat, user)


def chat_prompt(tokenizer, messages) -> str:
    """Messages ({role, content}; content a string or a list of text parts) -> the model's chat prompt."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content}")
    formatted = []
    for i, m in enumerate(messages):
        key = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(key, "must be an object with role and content")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise InvalidRequestError(f"{key}.{sorted(extra)[0]}", "is not supported in a message")
        role = m.get("role")
        if not isinstance(role, str):
            raise InvalidRequestError(f"{key}.role", "is required (a string)")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"{key}.role", f"unknown role {role!r}; known: {sorted(CHAT_ROLES)}")
        if "name" in m and not isinstance(m["name"], str):
            raise InvalidRequestError(f"{key}.name", "must be a string")
        formatted.append({"role": CHAT_ROLES[role], "content": _content(m.get("content"), f"{key}.content")})
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(f"{m['role']}: {m['content']}" for m in formatted) + "\nassistant:"
    return tokenizer.apply_chat_template(formatted, tokenize=False, add_generation_prompt=True)


def submit(driver: EngineDriver, request: ApiRequest, is_active) -> list[Choice]:
    """One stream per prompt x sample. Choice 0 uses the request's seed (drawn here if none was sent and
    there are several choices); choice i > 0 a seed derived from it, so a whole request replays from one
    seed and each choice reports its own. All are queued together, or none."""
    base = request.params.seed
    count = len(request.prompts) * request.n
    if base is None and count > 1:
        base = int.from_bytes(os.urandom(8), "little") >> 1
    wanted, index_of = [], []
    for p, prompt in enumerate(request.prompts):
        for j in range(request.n):
            index = p * request.n + j
            seed = base if index == 0 or base is None else sample_seed(base, index)
            wanted.append((prompt, dataclasses.replace(request.params, seed=seed)))
            index_of.append((index, p))
    streams = driver.stream_many(wanted, is_active)  # all queued together, or none
    choices = []
    for (index, p), stream in zip(index_of, streams):
        prompt = request.prompts[p]
        echo = ""
        if request.echo:
            echo = prompt if isinstance(prompt, str) else driver.tokenizer.decode(prompt)
        choices.append(Choice(index, p, stream, echo))
    if request.user:
        log.info("requests %s for user %r", [c.stream.request_id for c in choices], request.user)
    return choices


def sample_seed(seed: int, j: int) -> int:
    """The seed of sample j > 0 of a request seeded `seed` (splitmix64 of seed + j)."""
    z = (seed + j * 0x9E3779B97F4A7C15) & MAX_SEED
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MAX_SEED
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MAX_SEED
    return z ^ (z >> 31)


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


# --- field parsers ------------------------------------------------------------------------------------
def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number")


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(key, f"must be a finite number, got {_json_type(value)}")
    return value


def _integer(key: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(key, f"must be an integer, got {_json_type(value)}")
    return value


def _boolean(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(key, f"must be true or false, got {_json_type(value)}")
    return value


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    if not isinstance(value, dict):
        raise InvalidRequestError("logit_bias", "must be an object mapping token ids to biases")
    entries = []
    for token, bias in value.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            raise InvalidRequestError("logit_bias", f"key {token!r} is not a token id") from None
        entries.append((token_id, _number("logit_bias", bias)))
    return tuple(entries)


def _logprobs(get: dict, chat: bool) -> int | None:
    if chat:
        wanted = _boolean("logprobs", get.get("logprobs", False))
        top = _integer("top_logprobs", get["top_logprobs"]) if "top_logprobs" in get else 0
        if "top_logprobs" in get and not wanted:
            raise InvalidRequestError("top_logprobs", "requires logprobs: true")
        if not 0 <= top <= MAX_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        return top if wanted else None
    if "logprobs" not in get:
        return None
    top = _integer("logprobs", get["logprobs"])
    if not 0 <= top <= MAX_LOGPROBS:
        raise InvalidRequestError("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
    return top


def _prompts(prompt) -> list:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise InvalidRequestError("prompt", "must be a string, a list of strings, or token ids (a list or lists of integers)")


def _content(content, key: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"{key}[{i}]", "only text parts ({type: text, text}) are supported")
            if set(part) - {"type", "text"}:
                raise InvalidRequestError(f"{key}[{i}]", "a text part has only type and text")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequestError(key, "must be a string or a list of text parts")
