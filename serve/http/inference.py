"""OpenAI-compatible inference: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` as server-sent events). Each route parses, calls :class:`MemoryService.complete`, and formats; every
answer carries ``editmem`` (what shaped it, with the namespace routed in: the key's, else ``X-Editmem-Namespace`` or
the ``editmem.namespace`` option, else the server's ``--namespace``). These routes need the local model
(``--model``); a ``--model none`` server answers them with 503. A stream with ``n`` = 1 is sent as it is generated,
piece by piece; with ``n`` > 1 it is sent once the answers are generated."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from editors.retrieval.service import Completion, MemoryService
from serve.http.auth import request_namespace, require
from serve.http.protocol import (
    ApiError,
    ChatRequest,
    Chunks,
    CompletionRequest,
    chat_json,
    completion_json,
    stream_chunks,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(require("read"))])


def _service(request: Request, model: str | None = None) -> MemoryService:
    ctx = request.app.state.ctx
    if ctx.service is None:
        raise ApiError(503, "this server has no model loaded (--model none): only the edit store is served",
                       type="server_error", code="no_model")
    if model is not None and model != ctx.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {ctx.model_name!r}",
                       param="model", code="model_not_found")
    service: MemoryService = ctx.service
    return service


def _namespace(request: Request, asked: str | None) -> str:
    """The request's namespace (:func:`serve.http.auth.request_namespace`), within the server's cap on namespaces."""
    namespace = request_namespace(request, asked)
    request.app.state.ctx.admit(namespace)
    return namespace


@router.get("/models")
def models(request: Request) -> dict[str, Any]:
    ctx = request.app.state.ctx
    data = [] if ctx.service is None else [{"id": ctx.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "editmem"}]
    return {"object": "list", "data": data}


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    service = _service(request, body.model)
    opts = body.options()
    sampling = body.sampling(request.app.state.ctx.settings.default_max_tokens)
    options: dict[str, Any] = {"method": opts.method, "disable": opts.disable, "as_of": opts.as_of,
                               "namespace": _namespace(request, opts.namespace)}
    if body.stream and sampling.n == 1:
        events = await run_in_threadpool(service.stream, body.text(), sampling, **options)
        return _live_stream(request, events, body.model, chat=False)
    result = await run_in_threadpool(service.complete, body.text(), sampling, **options)
    return _answer(request, result, body.model, body.stream, chat=False)


@router.post("/chat/completions", response_model=None)
async def chat(body: ChatRequest, request: Request) -> Any:
    service = _service(request, body.model)
    opts = body.options()
    sampling = body.sampling(request.app.state.ctx.settings.default_max_tokens)
    prompt, route_text = service.chat_prompt([m.model_dump(include={"role", "content"}) for m in body.messages])
    templated = bool(getattr(service.tokenizer, "chat_template", None))
    options: dict[str, Any] = {"route_text": route_text, "method": opts.method, "disable": opts.disable,
                               "templated": templated, "as_of": opts.as_of,
                               "namespace": _namespace(request, opts.namespace)}
    if body.stream and sampling.n == 1:
        events = await run_in_threadpool(service.stream, prompt, sampling, **options)
        return _live_stream(request, events, body.model, chat=True)
    result = await run_in_threadpool(service.complete, prompt, sampling, **options)
    return _answer(request, result, body.model, body.stream, chat=True)


def _live_stream(request: Request, events: Iterator[str | Completion], model: str, *, chat: bool) -> Any:
    """An answer streamed as it is generated: a chunk per new piece of text, then the last chunk and ``[DONE]``."""
    chunks = Chunks(model, chat=chat)
    metrics = request.app.state.ctx.metrics

    def sse() -> Iterator[str]:
        for chunk in chunks.first():
            yield f"data: {json.dumps(chunk)}\n\n"
        for event in events:
            if isinstance(event, str):
                yield f"data: {json.dumps(chunks.piece(event))}\n\n"
            else:
                metrics.answers.labels(event.shaping.route).inc()
                for chunk in chunks.last(event):
                    yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _answer(request: Request, result: Completion, model: str, stream: bool, *, chat: bool) -> Any:
    request.app.state.ctx.metrics.answers.labels(result.shaping.route).inc()
    if not stream:
        return chat_json(result, model) if chat else completion_json(result, model)
    tok = request.app.state.ctx.service.tokenizer
    pieces = [_pieces(tok, c.text) for c in result.choices]
    chunks = stream_chunks(result, model, chat=chat, pieces=pieces)

    def events() -> Iterator[str]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _pieces(tokenizer: Any, text: str) -> list[str]:
    """``text`` cut where its tokens end (each piece what one more token adds to the decoded text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, done = [], ""
    for i in range(1, len(ids) + 1):
        now = tokenizer.decode(ids[:i], skip_special_tokens=True)
        if now.startswith(done) and len(now) > len(done):
            pieces.append(now[len(done):])
            done = now
    if done != text:
        pieces.append(text[len(done):] if text.startswith(done) else text)
    return pieces
