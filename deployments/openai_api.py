"""OpenAI-compatible HTTP: /v1/completions, /v1/chat/completions (with `stream: true` as server-sent
events), /v1/models, /healthz and /metrics (Prometheus), so the `openai` client works unchanged.

Every client mistake is a 400 with a JSON error body naming the parameter; a body over the size limit
is a 413; a request that fails inside the server is a 500 carrying only a request id (the traceback
stays in the server log). Routes read the process's driver from `state`, set by configure(): Ray
Serve may serve its own copy of `app`, so app.state is not used.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from types import SimpleNamespace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from cluster.errors import EngineOverloadedError, InvalidRequestError, ServerDrainingError
from cluster.serving.driver import last_delta
from cluster.types import FINISH_ERROR, FinalDelta
from deployments.api import ApiRequest, Choice, parse_openai, submit, token_text

log = logging.getLogger(__name__)
app = FastAPI(title="specdec", version="1")
state = SimpleNamespace(driver=None, model_id="", api_key=None)  # one serving replica per process


def configure(driver, model_id: str, api_key: str | None = None) -> FastAPI:
    state.driver, state.model_id, state.api_key = driver, model_id, api_key
    return app


class BodyTooLarge(Exception):
    pass


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}})


def _internal_error(request_id: str) -> JSONResponse:
    return _error(500, f"internal error (request id {request_id})", kind="internal_error")


@app.middleware("http")
async def _guard(request: Request, call_next):
    """API key, and per-route status counts. Unexpected exceptions become a bare 500, logged here."""
    path = request.url.path
    key = state.api_key
    if key and path.startswith("/v1/"):
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            response = _error(401, "missing or wrong API key", kind="authentication_error")
            _count(path, response.status_code)
            return response
    try:
        response = await call_next(request)
    except Exception:
        request_id = uuid.uuid4().hex
        log.exception("unhandled error in %s (request id %s)", path, request_id)
        response = _internal_error(request_id)
    _count(path, response.status_code)
    return response


def _count(path: str, status: int) -> None:
    if state.driver is not None and path.startswith(("/v1/", "/healthz")):
        route = path if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz") else "other"
        state.driver.metrics.api_requests.labels("http", route, str(status)).inc()


@app.get("/healthz")
async def healthz():
    if state.driver is None or not state.driver.alive:
        return JSONResponse(status_code=503, content={"status": "unavailable"})
    return {"status": "ok"}


@app.get("/metrics")
async def metrics():
    if state.driver is None:
        return PlainTextResponse("", status_code=503)
    await run_in_threadpool(state.driver.call, lambda engine: engine.target_utilization())  # refresh the gauge
    return PlainTextResponse(state.driver.metrics.text(), media_type="text/plain; version=0.0.4")


@app.get("/v1/models")
async def models():
    return {"object": "list", "data": [{"id": state.model_id, "object": "model", "owned_by": "specdec",
                                        "max_model_len": state.driver.max_model_len}]}


@app.post("/v1/completions")
async def completions(request: Request):
    return await _serve(request, chat=False)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _serve(request, chat=True)


async def _read_json(request: Request):
    limit = state.driver.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return json.loads(b"".join(chunks))


async def _serve(request: Request, chat: bool):
    driver = state.driver
    try:
        body = await _read_json(request)
    except BodyTooLarge:
        return _error(413, f"body exceeds {driver.limits.max_body_bytes} bytes", kind="request_too_large")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return _error(400, "body is not valid JSON")
    if isinstance(body, dict) and body.get("model") not in (None, "", state.model_id):
        return _error(404, f"model: unknown model {body.get('model')!r}", "model", "not_found_error")
    gone = threading.Event()  # set when the client goes away: the driver then cancels the request
    try:
        # Validation and tokenisation run here, off the event loop and outside the step thread.
        api = await run_in_threadpool(parse_openai, body, chat, driver)
        choices = await run_in_threadpool(submit, driver, api, lambda: not gone.is_set())
    except InvalidRequestError as e:
        return _error(400, str(e), e.field)
    except EngineOverloadedError as e:
        return _error(429, str(e), kind="rate_limit_error")
    except ServerDrainingError as e:
        return _error(503, str(e), kind="unavailable")
    created, cid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    if api.stream:
        return StreamingResponse(_sse(request, api, choices, cid, created, gone), media_type="text/event-stream")
    try:
        finals = await asyncio.gather(*(run_in_threadpool(last_delta, c.stream) for c in choices))
    except asyncio.CancelledError:  # the client went away: stop generating now
        gone.set()
        for c in choices:
            asyncio.get_running_loop().run_in_executor(None, c.stream.close)
        raise
    failed = [f for f in finals if f is None or f.finish_reason == FINISH_ERROR]
    if failed:
        return _internal_error(",".join(c.stream.request_id for c, f in zip(choices, finals) if f in failed))
    return {
        "id": cid, "object": "chat.completion" if api.chat else "text_completion", "created": created,
        "model": state.model_id,
        "choices": [_choice(api, c, f) for c, f in zip(choices, finals)],
        "usage": _usage(api, choices, finals),
        "speculation": {"target_passes": sum(f.stats.steps for f in finals),
                        "drafted_tokens": sum(f.stats.drafted for f in finals),
                        "accepted_tokens": sum(f.stats.accepted for f in finals)},
    }


def _choice(api: ApiRequest, c: Choice, final: FinalDelta) -> dict:
    choice = {"index": c.index, "finish_reason": _finish(final.finish_reason), "seed": final.seed}
    text = c.echo_text + final.full_text
    if api.chat:
        choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = _chat_logprobs(final.full_logprobs) if api.params.logprobs is not None else None
    else:
        choice["text"] = text
        choice["logprobs"] = _completion_logprobs(final.full_logprobs, len(c.echo_text)) \
            if api.params.logprobs is not None else None
    return choice


def _usage(api: ApiRequest, choices: list[Choice], finals: list[FinalDelta]) -> dict:
    prompt = sum(f.prompt_tokens for c, f in zip(choices, finals) if c.index % api.n == 0)  # once per prompt
    completion = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(request: Request, api: ApiRequest, choices: list[Choice], cid: str, created: int,
               gone: threading.Event):
    kind = "chat.completion.chunk" if api.chat else "text_completion"
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        try:
            async for delta in iterate_in_threadpool(c.stream):
                await queue.put((c, delta))
        finally:
            await queue.put((c, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    finals: dict[int, FinalDelta] = {}
    first = {c.index: True for c in choices}
    try:
        open_streams = len(choices)
        while open_streams:
            c, delta = await queue.get()
            if delta is None:
                open_streams -= 1
                continue
            if await request.is_disconnected():
                break
            if isinstance(delta, FinalDelta):
                finals[c.index] = delta
                if delta.finish_reason == FINISH_ERROR:
                    err = {"message": f"internal error (request id {c.stream.request_id})", "type": "internal_error"}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    break
            text = (c.echo_text if first[c.index] else "") + delta.text
            finish = _finish(delta.finish_reason) if isinstance(delta, FinalDelta) else None
            if api.chat:
                content = {"role": "assistant", "content": text} if first[c.index] else {"content": text}
                choice = {"index": c.index, "delta": content, "finish_reason": finish}
                if api.params.logprobs is not None:
                    choice["logprobs"] = _chat_logprobs(delta.logprobs or [])
            else:
                choice = {"index": c.index, "text": text, "finish_reason": finish}
                choice["logprobs"] = _completion_logprobs(delta.logprobs or [], 0) \
                    if api.params.logprobs is not None else None
            if finish:
                choice["seed"] = delta.seed
            first[c.index] = False
            chunk = {"id": cid, "object": kind, "created": created, "model": state.model_id, "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n"
        else:
            if api.include_usage:
                usage = _usage(api, choices, [finals[c.index] for c in choices])
                chunk = {"id": cid, "object": kind, "created": created, "model": state.model_id, "choices": [],
                         "usage": usage}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
    finally:
        # Not awaited: on a disconnect Starlette cancels this task, and an await here would be cancelled too.
        gone.set()
        for c in choices:
            asyncio.get_running_loop().run_in_executor(None, c.stream.cancel)
        for t in tasks:
            t.cancel()


def _completion_logprobs(entries, offset: int) -> dict:
    tokenizer = state.driver.tokenizer
    tokens, token_lps, tops, offsets = [], [], [], []
    for e in entries:
        text = token_text(tokenizer, e.token_id)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        token_lps.append(e.logprob)
        tops.append({token_text(tokenizer, t): lp for t, lp in e.top})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(entries) -> dict:
    tokenizer = state.driver.tokenizer

    def item(token_id, logprob):
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)
