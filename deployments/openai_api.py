"""OpenAI-compatible HTTP: /v1/completions, /v1/chat/completions (with `stream: true` as server-sent
events) and /v1/models, so the `openai` client works unchanged. Routes read the process's driver from
`state`, set by configure(): Ray Serve may serve its own copy of `app`, so app.state is not used."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from cluster.errors import EngineOverloadedError, InvalidRequestError
from cluster.serving.driver import last_delta
from cluster.types import FinalDelta

app = FastAPI(title="specdec", version="1")
state = SimpleNamespace(driver=None, model_id="", tokenizer=None, api_key=None)  # one serving replica per process


def configure(driver, model_id: str, tokenizer, api_key: str | None = None) -> FastAPI:
    state.driver, state.model_id, state.tokenizer, state.api_key = driver, model_id, tokenizer, api_key
    return app


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}})


@app.middleware("http")
async def _auth(request: Request, call_next):
    key = state.api_key
    if key and request.url.path.startswith("/v1/"):
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            return _error(401, "missing or wrong API key", kind="authentication_error")
    return await call_next(request)


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}


@app.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [{"id": state.model_id, "object": "model", "owned_by": "specdec"}]}


@app.post("/v1/completions")
async def completions(request: Request):
    return await _serve(request, chat=False)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _serve(request, chat=True)


async def _serve(request: Request, chat: bool):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "body is not valid JSON")
    if body.get("model") not in (None, "", state.model_id):
        return _error(404, f"model: unknown model {body.get('model')!r}", "model", "not_found_error")
    try:
        prompt = _chat_prompt(state.tokenizer, body.get("messages")) if chat else body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt", "must be a string")
        gone = threading.Event()  # set when the client goes away: the driver then cancels the request
        stream = state.driver.stream(prompt, _params(state.driver, body), is_active=lambda: not gone.is_set())
    except InvalidRequestError as e:
        return _error(400, str(e), e.field)
    except EngineOverloadedError as e:
        return _error(429, str(e), kind="rate_limit_error")
    created, cid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    if body.get("stream"):
        return StreamingResponse(_sse(request, stream, chat, cid, created), media_type="text/event-stream")
    try:
        final = await run_in_threadpool(last_delta, stream)
    except asyncio.CancelledError:  # the client went away: stop generating now
        gone.set()
        asyncio.get_running_loop().run_in_executor(None, stream.cancel)
        raise
    choice = {"index": 0, "finish_reason": _finish(final.finish_reason)}
    if chat:
        choice["message"] = {"role": "assistant", "content": final.full_text}
    else:
        choice["text"], choice["logprobs"] = final.full_text, None
    return {
        "id": cid, "object": "chat.completion" if chat else "text_completion", "created": created,
        "model": state.model_id, "choices": [choice],
        "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
                  "total_tokens": final.prompt_tokens + final.completion_tokens},
        "speculation": {"target_passes": final.stats.steps, "drafted_tokens": final.stats.drafted,
                        "accepted_tokens": final.stats.accepted},
    }


async def _sse(request: Request, stream, chat: bool, cid: str, created: int):
    kind = "chat.completion.chunk" if chat else "text_completion"
    try:
        first = True
        async for delta in iterate_in_threadpool(stream):
            if await request.is_disconnected():
                break
            finish = _finish(delta.finish_reason) if isinstance(delta, FinalDelta) else None
            if chat:
                content = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
                choice = {"index": 0, "delta": content, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta.text, "logprobs": None, "finish_reason": finish}
            first = False
            chunk = {"id": cid, "object": kind, "created": created, "model": state.model_id, "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n"
        else:
            yield "data: [DONE]\n\n"
    finally:
        # Not awaited: on a disconnect Starlette cancels this task, and an await here would be cancelled too.
        asyncio.get_running_loop().run_in_executor(None, stream.cancel)


def _params(driver, body: dict):
    overrides = {}
    for key in ("max_tokens", "temperature", "top_p", "seed"):
        if body.get(key) is not None:
            overrides[key] = body[key]
    if body.get("top_k") is not None:
        overrides["top_k"] = body["top_k"]
    stop = body.get("stop")
    if stop is not None:
        overrides["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return driver.engine.default_params(**overrides)


def _chat_prompt(tokenizer, messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content}")
    if any(not isinstance(m, dict) or not isinstance(m.get("content"), str) for m in messages):
        raise InvalidRequestError("messages", "each message needs a string content")
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)
