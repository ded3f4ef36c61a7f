"""Proxy-mode inference routes (``--upstream URL``): the same three OpenAI routes as :mod:`serve.http.inference`, each
routed by :class:`editors.retrieval.proxy.ContextRouter` and forwarded to the upstream server (untouched out of scope;
with the edit in context in scope). The upstream's answer comes back as it is, with editmem's ``editmem`` field set
(and, in a stream, one extra chunk before ``[DONE]`` carrying it). No local model is loaded."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from editors.retrieval.service import Shaping
from serve.http.auth import request_namespace, require
from serve.http.protocol import ApiError, ChatRequest, CompletionRequest

router = APIRouter(prefix="/v1", dependencies=[Depends(require("read"))])


def _ctx(request: Request) -> Any:
    return request.app.state.ctx


def _check(body: Any) -> str | None:
    """The request's editmem.method (None: the server's); refuses what proxy mode cannot do."""
    opts = body.options()
    if opts.as_of is not None:
        raise ApiError(400, "editmem.as_of is not supported in proxy mode", param="editmem.as_of",
                       code="unsupported")
    return opts.method


def _forwarded(body: Any, **replace: Any) -> dict[str, Any]:
    data = body.model_dump(exclude_unset=True, exclude_none=True)
    data.pop("editmem", None)
    data.update(replace)
    return dict(data)


async def _send(request: Request, path: str, payload: dict[str, Any] | None, shaping: Shaping | None) -> Any:
    ctx = _ctx(request)
    client: httpx.AsyncClient = ctx.upstream
    req = client.build_request("POST" if payload is not None else "GET", path, json=payload)
    try:
        response = await client.send(req, stream=True)
    except httpx.HTTPError as err:
        raise ApiError(502, f"the upstream server did not answer: {err}", type="server_error",
                       code="upstream_unreachable") from None
    if shaping is not None:
        ctx.metrics.answers.labels(shaping.route).inc()
    streaming = response.headers.get("content-type", "").startswith("text/event-stream")
    if not streaming:
        raw = await response.aread()
        await response.aclose()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise ApiError(502, "the upstream server's answer is not JSON", type="server_error",
                           code="upstream_bad_answer") from None
        if shaping is not None and response.status_code < 400 and isinstance(data, dict):
            data["editmem"] = shaping.to_json()
        return JSONResponse(data, status_code=response.status_code)

    async def events() -> AsyncIterator[str]:
        try:
            async for line in response.aiter_lines():
                if line.strip() == "data: [DONE]" and shaping is not None:
                    yield "data: " + json.dumps({"object": "editmem", "choices": [],
                                                 "editmem": shaping.to_json()}) + "\n\n"
                if line:
                    yield line + "\n\n"
        finally:
            await response.aclose()

    return StreamingResponse(events(), status_code=response.status_code, media_type="text/event-stream")


@router.get("/models")
async def models(request: Request) -> Any:
    return await _send(request, "models", None, None)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    from fastapi.concurrency import run_in_threadpool

    method = _check(body)
    if body.editmem is not None and body.editmem.disable:
        return await _send(request, "completions", _forwarded(body), Shaping("base", None))
    router_ = _ctx(request).proxy_for(request_namespace(request, body.options().namespace))
    prompt, shaping = await run_in_threadpool(router_.completion, body.text(), method)
    return await _send(request, "completions", _forwarded(body, prompt=prompt), shaping)


@router.post("/chat/completions", response_model=None)
async def chat(body: ChatRequest, request: Request) -> Any:
    from fastapi.concurrency import run_in_threadpool

    method = _check(body)
    if body.editmem is not None and body.editmem.disable:
        return await _send(request, "chat/completions", _forwarded(body), Shaping("base", None))
    messages = [m.model_dump() for m in body.messages]
    router_ = _ctx(request).proxy_for(request_namespace(request, body.options().namespace))
    messages, shaping = await run_in_threadpool(router_.chat, messages, method)
    return await _send(request, "chat/completions", _forwarded(body, messages=messages), shaping)
