"""Operations routes: ``/healthz`` (the process answers), ``/readyz`` (model loaded, store reachable, index caught
up, in every open namespace; 503 otherwise) and ``/metrics`` (Prometheus text format). None needs a key."""

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
    """Ready when the model is loaded and, for every namespace the server has open, the store answers and the vector
    index has caught up with it. The top-level ``change``/``index`` are the server's default namespace's;
    ``namespaces`` has each open one's."""
    ctx = request.app.state.ctx
    checks: dict[str, object] = {"model": ctx.service is not None or ctx.settings.model == "none"}
    spaces: dict[str, dict[str, object]] = {}
    for namespace, memory in sorted(dict(ctx.memories).items()):
        try:
            indexed = catch_up(memory)
            change = change_number(memory)
            spaces[namespace] = {"store": True, "change": change, "index": indexed,
                                 "index_caught_up": indexed >= change}
        except EditmemError as err:
            spaces[namespace] = {"store": False, "store_error": str(err), "index_caught_up": False}
    default = spaces.get(ctx.memory.namespace, {})
    checks.update({k: v for k, v in default.items() if k != "index_caught_up"})
    checks["store"] = all(s["store"] for s in spaces.values())
    checks["index_caught_up"] = all(s["index_caught_up"] for s in spaces.values())
    checks["namespaces"] = spaces
    ready = bool(checks["model"] and checks["store"] and checks["index_caught_up"])
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    ctx = request.app.state.ctx
    return Response(ctx.metrics.render(dict(ctx.memories), ctx.live), media_type=CONTENT_TYPE_LATEST)
