"""The edit store over HTTP, one route per ``EditMemory`` verb, same field names and the same validation (a
ValidationError is a 400, a NotFoundError a 404, with the store's one-line message). Reading needs a ``read`` key,
writing a ``write`` key, importing an ``admin`` key. None of these routes needs a model.

    POST   /v1/edits                      create (201)          GET  /v1/edits?limit=&offset=&include_deleted=
                                                                              &subject=&contains=
    GET    /v1/edits/{id}?version=        get                   PATCH /v1/edits/{id}   update (a new version)
    DELETE /v1/edits/{id}                 delete (tombstone)    GET  /v1/edits/{id}/history
    POST   /v1/edits/{id}/rollback        {"version": v}        GET  /v1/edits/search?q=&k=
    POST   /v1/edits/import               a file (multipart "file", optional "format") or {"records": [...]}
    POST   /v1/edits/delete               {"ids": [...]}: many deletes, all or none (one by one, following saved
                                          weights, when an edited model holds one of them)
    GET    /v1/edits/export?include_history=   JSONL            GET  /v1/edits/changes?since=&limit=

Every route reads and writes one store namespace: the key's if it is bound to one, else the ``namespace`` query
parameter or the ``X-Editmem-Namespace`` header, else the server's ``--namespace``. Ids are global, so another
namespace's edit id is a 404 here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError as PydanticError

from memory.errors import ValidationError
from memory.feed import change_number, changes_since
from serve.http.auth import request_namespace, require
from serve.http.protocol import ApiError, DeleteBody, EditBody, EditChanges, ImportBody, RollbackBody, edit_json

router = APIRouter(prefix="/v1/edits")
READ, WRITE, ADMIN = Depends(require("read")), Depends(require("write")), Depends(require("admin"))
NAMESPACE = Query(None, max_length=64, description="the store namespace (default: the key's, the "
                  "X-Editmem-Namespace header's, or the server's)")
MAX_PAGE = 1000


def _memory(request: Request, namespace: str | None) -> Any:
    """The store handle of the request's namespace (:func:`serve.http.auth.request_namespace`)."""
    return request.app.state.ctx.memory_for(request_namespace(request, namespace))


@router.post("", status_code=201, dependencies=[WRITE])
def create(body: EditBody, request: Request, namespace: str | None = NAMESPACE) -> dict[str, Any]:
    record = _memory(request, namespace).add(**body.model_dump())
    request.app.state.ctx.after_write()
    return edit_json(record)


@router.get("", dependencies=[READ])
def list_edits(request: Request, namespace: str | None = NAMESPACE, limit: int = Query(50, ge=0, le=MAX_PAGE),
               offset: int = Query(0, ge=0), include_deleted: bool = False,
               subject: str | None = Query(None, description="only edits with this exact subject"),
               contains: str | None = Query(None, description="only edits whose prompt or target contains this "
                                                              "text (any case)")) -> dict[str, Any]:
    """A page of edits; ``total`` counts the live edits of the namespace, ``matched`` those the filters let through
    (all of them, deleted ones included with ``include_deleted``)."""
    mem = _memory(request, namespace)
    filters = {"include_deleted": include_deleted, "subject": subject, "contains": contains}
    records = mem.list(limit=limit, offset=offset, **filters)
    return {"object": "list", "data": [edit_json(r) for r in records], "limit": limit, "offset": offset,
            "total": len(mem), "matched": mem.count(**filters), "change": change_number(mem)}


@router.get("/search", dependencies=[READ])
def search(request: Request, namespace: str | None = NAMESPACE, q: str = Query(..., min_length=1),
           k: int = Query(5, ge=1, le=100)) -> dict[str, Any]:
    hits = _memory(request, namespace).search(q, k)
    return {"object": "list", "data": [{"score": h.score, "edit": edit_json(h.edit)} for h in hits]}


@router.get("/changes", dependencies=[READ])
def changes(request: Request, namespace: str | None = NAMESPACE, since: int = Query(0, ge=0),
            limit: int = Query(MAX_PAGE, ge=1, le=MAX_PAGE)) -> dict[str, Any]:
    mem = _memory(request, namespace)
    now = change_number(mem)
    return {"object": "list", "change": now, "data": [c.to_json() for c in changes_since(mem, since, limit)]}


@router.get("/export", dependencies=[READ])
def export(request: Request, namespace: str | None = NAMESPACE, include_history: bool = False) -> Response:
    with tempfile.TemporaryDirectory(prefix="editmem-export-") as tmp:
        path = Path(tmp) / "edits.jsonl"
        _memory(request, namespace).export(path, include_history=include_history)
        text = path.read_text(encoding="utf-8")
    return Response(text, media_type="application/x-ndjson",
                    headers={"Content-Disposition": 'attachment; filename="edits.jsonl"'})


@router.post("/import", dependencies=[ADMIN])
async def import_edits(request: Request, namespace: str | None = NAMESPACE) -> JSONResponse:
    """A multipart upload (``file`` in any supported format, ``format`` optional) or a JSON body ``{"records":
    [...]}`` of ``add`` fields. All or nothing: a bad file or record changes nothing."""
    from fastapi.concurrency import run_in_threadpool

    mem = _memory(request, namespace)
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        upload, fmt = form.get("file"), form.get("format") or "auto"
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "the upload needs a 'file' field", param="file")
        suffix = Path(upload.filename or "edits.jsonl").suffix or ".jsonl"
        data = await upload.read()
        fd, name = tempfile.mkstemp(prefix="editmem-import-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            added = await run_in_threadpool(mem.import_file, name, str(fmt))
        finally:
            os.unlink(name)
    else:
        try:
            body = ImportBody.model_validate(json.loads(await request.body()))
        except json.JSONDecodeError as err:
            raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
        except PydanticError as err:
            raise ApiError(400, f"expected {{\"records\": [...]}}: {err.errors()[0]['msg']}") from None
        added = len(await run_in_threadpool(mem.add_many, body.records))
    await run_in_threadpool(request.app.state.ctx.after_write)
    return JSONResponse({"added": added, "change": change_number(mem)})


@router.post("/delete", dependencies=[WRITE])
def delete_many(body: DeleteBody, request: Request, namespace: str | None = NAMESPACE) -> dict[str, Any]:
    from editors.consolidation import delete_following

    mem = _memory(request, namespace)
    with _weights_writing(request) as lines:
        tombstones = delete_following(mem, body.ids, report=lines.append)
    return _with_weights({"object": "list", "data": [edit_json(t) for t in tombstones],
                          "change": change_number(mem)}, lines)


@router.get("/{edit_id}", dependencies=[READ])
def get(edit_id: int, request: Request, namespace: str | None = NAMESPACE, version: int | None = None
        ) -> dict[str, Any]:
    return edit_json(_memory(request, namespace).get(edit_id, version))


@contextmanager
def _weights_writing(request: Request) -> Iterator[list[str]]:
    """Around a change that saved edited models follow: hold the served weights' lock, collect what the followers
    did (lines for ``weights``), then, if the change went through, let the served model follow too
    (:meth:`serve.http.app.Context.after_write`)."""
    ctx = request.app.state.ctx
    lines: list[str] = []
    with ctx.weights_lock:
        yield lines
    ctx.after_write()


def _with_weights(body: dict[str, Any], lines: list[str]) -> dict[str, Any]:
    """``body`` with what the saved edited models did under ``weights`` (absent when none held the edits)."""
    if lines:
        body["weights"] = lines
    return body


def _following_weights(request: Request, mem: Any, edit_id: int, change: Callable[[], Any]) -> dict[str, Any]:
    """``change()`` (an update, delete or rollback of ``edit_id``) as the CLI makes it: a saved edited model that
    holds the edit follows it exactly (:func:`editors.consolidation.weights_follow`)."""
    from editors.consolidation import weights_follow

    with _weights_writing(request) as lines, weights_follow(mem, edit_id, report=lines.append):
        record = change()
    return _with_weights(edit_json(record), lines)


@router.patch("/{edit_id}", dependencies=[WRITE])
def update(edit_id: int, body: EditChanges, request: Request, namespace: str | None = NAMESPACE) -> dict[str, Any]:
    changes_ = body.model_dump(exclude_unset=True)
    if not changes_:
        raise ValidationError("an update needs at least one field to change")
    mem = _memory(request, namespace)
    return _following_weights(request, mem, edit_id, lambda: mem.update(edit_id, **changes_))


@router.delete("/{edit_id}", dependencies=[WRITE])
def delete(edit_id: int, request: Request, namespace: str | None = NAMESPACE) -> dict[str, Any]:
    mem = _memory(request, namespace)
    return _following_weights(request, mem, edit_id, lambda: mem.delete(edit_id))


@router.get("/{edit_id}/history", dependencies=[READ])
def history(edit_id: int, request: Request, namespace: str | None = NAMESPACE) -> dict[str, Any]:
    return {"object": "list", "data": [edit_json(r) for r in _memory(request, namespace).history(edit_id)]}


@router.post("/{edit_id}/rollback", dependencies=[WRITE])
def rollback(edit_id: int, body: RollbackBody, request: Request, namespace: str | None = NAMESPACE
             ) -> dict[str, Any]:
    mem = _memory(request, namespace)
    return _following_weights(request, mem, edit_id, lambda: mem.rollback(edit_id, body.version))
