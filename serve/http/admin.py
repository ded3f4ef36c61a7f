"""Admin routes (an ``admin`` key): the key list, consolidation of the store's edits into a model's weights as a
background job, the jobs, and the edited models the store keeps weight records for.

    GET  /v1/admin/keys                 what the keys allow (role, namespace, how many keys), never the keys
    POST /v1/admin/consolidate          {"method", "out", "model"?, "batch_size"?, "every"?, "settings"?} -> 202, a job
                                        (200 "nothing_due" when ``every`` finds fewer pending edits than that)
    GET  /v1/admin/jobs                 the jobs this server has run (the last 100), newest last
    GET  /v1/admin/jobs/{id}            one job: queued, running, succeeded (with its result) or failed (why)
    GET  /v1/admin/weights              the store's edited models, with their applied weight records

A consolidation is checked before it is queued (unknown method, bad batch size, an empty store, a folder that is
not this store's: 400, as ``editmem consolidate`` says it) and then runs as :func:`editors.consolidation.consolidate`
does, on a store handle of its own. Its ``out`` is a folder *name* under the server's ``--weights-dir`` (default
``$EDITMEM_CACHE/weights``): an HTTP client does not name arbitrary paths on the server's disk."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from memory.errors import ValidationError
from serve.http.auth import request_namespace, require
from serve.http.protocol import ConsolidateBody

router = APIRouter(prefix="/v1/admin")
ADMIN = Depends(require("admin"))
NAMESPACE = Query(None, max_length=64, description="the store namespace whose edits are consolidated")
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def weights_dir(settings: Any) -> Path:
    """Where HTTP consolidations save their models: ``--weights-dir``, default ``<cache dir>/weights``."""
    from memory.paths import cache_subdir

    return Path(settings.weights_dir).expanduser() if settings.weights_dir else cache_subdir("weights")


def out_folder(settings: Any, name: str) -> Path:
    if not FOLDER_NAME.fullmatch(name) or ".." in name:
        raise ValidationError(f"out must be a folder name (letters, digits, '.', '_', '-'; no path), got {name!r}")
    return weights_dir(settings) / name


@router.get("/keys", dependencies=[ADMIN])
def keys(request: Request) -> dict[str, Any]:
    ring = request.app.state.ctx.keys
    return {"object": "list", "keys_configured": ring is not None, "data": ring.summary() if ring else []}


@router.post("/consolidate", status_code=202, dependencies=[ADMIN])
def consolidate(body: ConsolidateBody, request: Request, namespace: str | None = NAMESPACE) -> JSONResponse:
    from editors.consolidation import NothingDue, plan_consolidation, run_consolidation
    from memory.store import EditMemory

    ctx = request.app.state.ctx
    ns = request_namespace(request, namespace)
    out = out_folder(ctx.settings, body.out)
    try:
        plan = plan_consolidation(ctx.memory_for(ns), body.method, out, model=body.model,
                                  batch_size=body.batch_size, every=body.every)
    except NothingDue as err:  # the policy's normal case, not a failure: the edits keep answering from memory
        return JSONResponse({"object": "consolidation", "status": "nothing_due", "message": str(err)})
    params = {"method": body.method, "out": str(out), "model": plan.base, "batch_size": body.batch_size,
              "every": body.every, "settings": body.settings, "namespace": ns}

    def run() -> dict[str, Any]:
        out.parent.mkdir(parents=True, exist_ok=True)
        with ctx.weights_lock, EditMemory.open(ctx.settings.store, create=False, namespace=ns) as mem:
            done = run_consolidation(mem, plan, overrides=body.settings)
        ctx.after_write()  # the served model follows, if this is its folder
        return {"edits": done.n_edits, "folder": str(done.folder), "model_id": done.model.id,
                "base": done.model.base, "records": [record_json(r) for r in done.records]}

    job = ctx.jobs.submit("consolidate", params, run)
    return JSONResponse(job.to_json(), status_code=202)


@router.get("/jobs", dependencies=[ADMIN])
def jobs(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [j.to_json() for j in request.app.state.ctx.jobs.list()]}


@router.get("/jobs/{job_id}", dependencies=[ADMIN])
def job(job_id: int, request: Request) -> dict[str, Any]:
    return dict(request.app.state.ctx.jobs.get(job_id).to_json())


@router.get("/weights", dependencies=[ADMIN])
def weights(request: Request) -> dict[str, Any]:
    mem = request.app.state.ctx.memory
    return {"object": "list", "data": [
        {"id": m.id, "base": m.base, "folder": m.folder, "fingerprint": m.fingerprint,
         "records": [record_json(r) for r in mem.weight_records(model_id=m.id)]}
        for m in mem.weight_models()]}


def record_json(record: Any) -> dict[str, Any]:
    """A weight record as the admin routes show it: its id, the edits it holds, the parameters it changed."""
    return {"id": record.id, "edit_ids": list(record.edit_ids), "params": list(record.params)}
