"""Operations routes: ``/healthz`` (the process answers), ``/readyz`` (model loaded, store reachable, index caught
up; 503 otherwise) and ``/metrics`` (Prometheus text format). None needs a key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from memory.errors import EditmemError
from memory.feed import catch_up, change_number

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    ctx = request.app.state.ctx
    checks: dict[str, object] = {"model": ctx.service is not None or ctx.settings.model == "none"}
    try:
        indexed = catch_up(ctx.memory)
        change = change_number(ctx.memory)
        checks.update(store=True, change=change, index=indexed, index_caught_up=indexed >= change)
    except EditmemError as err:
        checks.update(store=False, store_error=str(err), index_caught_up=False)
    ready = bool(checks["model"] and checks["store"] and checks["index_caught_up"])
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    ctx = request.app.state.ctx
    return Response(ctx.metrics.render(ctx.memory), media_type=CONTENT_TYPE_LATEST)
