"""One pure ASGI middleware for every request: the body cap (413 over it; 411 for a body without a Content-Length),
one log line (method, path, status, milliseconds; never a header, so never a key) and the request metrics."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from serve.http.protocol import error_body

log = logging.getLogger("editmem.http")
WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class RequestMiddleware:
    def __init__(self, app: Any, ctx: Any):
        self.app = app
        self.ctx = ctx
        self.limit = int(ctx.settings.max_body_bytes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        refusal = self._refusal(scope)
        self.ctx.metrics.in_flight.inc()
        try:
            if refusal is not None:
                await _reply(sending, *refusal)
            else:
                await self.app(scope, receive, sending)
        finally:
            self.ctx.metrics.in_flight.dec()
            seconds = time.perf_counter() - t0
            path = getattr(scope.get("route"), "path", "other")
            self.ctx.metrics.observe(scope["method"], path, status[0], seconds)
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status[0], seconds * 1e3)

    def _refusal(self, scope: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        if scope["method"] not in WITH_BODY:
            return None
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        length = headers.get(b"content-length")
        if length is None:
            if headers.get(b"transfer-encoding"):
                return 411, error_body("send the body with a Content-Length", "invalid_request_error",
                                       code="length_required")
            return None
        if not length.isdigit():
            return 400, error_body("the Content-Length is not a number", "invalid_request_error")
        if int(length) > self.limit:
            return 413, error_body(f"the request body is {int(length)} bytes; this server takes at most "
                                   f"{self.limit}", "invalid_request_error", code="body_too_large")
        return None


async def _reply(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
