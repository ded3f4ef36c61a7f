"""The FastAPI application of ``editmem serve``: ``create_app(settings)`` opens the store, loads the model (unless
``model="none"``: then only the edit store, the page and the ops routes answer), and mounts the inference, edits and
ops routes and the page. Every request is logged in one line (method, path, status, milliseconds; never a header),
counted in the metrics, and bodies are capped (413). Errors are OpenAI's error JSON."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from editors.retrieval.service import Limits, MemoryService, ServiceSettings
from memory.errors import EditmemError, FormatError, NotFoundError, StoreError, ValidationError
from serve.http.auth import KeyRing, load_keys
from serve.http.jobs import JobRunner
from serve.http.metrics import Metrics
from serve.http.protocol import ApiError, error_body

log = logging.getLogger("editmem.http")
STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class ServerSettings:
    """What ``editmem serve`` is given. ``model``: alias, local folder, or ``"none"`` (no inference routes)."""

    store: str
    model: str = "smollm2-135m"
    method: str = "serac"
    scope: str = "default"
    threshold: float | None = None
    k: int = 5
    options: dict[str, Any] = field(default_factory=dict)
    api_keys: str | None = None
    max_body_bytes: int = 1 << 20
    limits: Limits = field(default_factory=Limits)
    default_max_tokens: int = 16
    max_batch: int = 8  # greedy requests waiting together share one generate call of at most this many (1: off)
    batch_wait: float = 0.2  # seconds a generate call waits at most for requests sure to come (0: never)
    cors_origins: tuple[str, ...] = ()
    upstream: str | None = None  # proxy mode: the OpenAI-compatible server to forward to (its /v1 URL)
    upstream_key: str | None = None  # the key sent to the upstream (default: $EDITMEM_UPSTREAM_KEY)
    upstream_timeout: float = 300.0
    namespace: str = "default"  # the store namespace of requests that name none (and whose key is not bound to one)
    max_namespaces: int = 64  # namespaces the server keeps a store handle (and editors) open for
    weights_dir: str | None = None  # where admin consolidations save models (default: <cache dir>/weights)
    # Memory first, the weights as the fallback: after writes, when this many edits are pending, a background job
    # consolidates the oldest (whole groups of this many) into the served model's folder and the live model.
    consolidate_every: int | None = None
    consolidate_method: str = "memit"
    consolidate_out: str | None = None  # the edited model folder (default: --model, which must be one of the store)
    consolidate_settings: dict[str, Any] = field(default_factory=dict)  # the weight editor's settings


@dataclass
class Context:
    settings: ServerSettings
    memory: Any  # the EditMemory the edit routes use
    service: MemoryService | None
    keys: KeyRing | None
    metrics: Metrics
    model_name: str
    proxy: Any = None  # proxy mode: the ContextRouter of the default namespace
    upstream: Any = None  # proxy mode: the httpx.AsyncClient to the upstream
    memories: dict[str, Any] = field(default_factory=dict)  # namespace -> its open EditMemory (one handle each)
    proxies: dict[str, Any] = field(default_factory=dict)  # proxy mode: namespace -> its ContextRouter
    jobs: JobRunner = field(default_factory=JobRunner)  # admin work in the background (consolidation)
    live: Any = None  # editors.consolidation.LiveWeights: the served model follows its folder's weight records
    # Held by whatever writes a saved model folder here (consolidation jobs, a delete/rollback/update that the
    # weights follow), so two of them never load, change and save the same folder at once.
    weights_lock: threading.Lock = field(default_factory=threading.Lock)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.memories[self.memory.namespace] = self.memory
        if self.proxy is not None:
            self.proxies[self.proxy.memory.namespace] = self.proxy

    def admit(self, namespace: str) -> None:
        """Refuse a namespace past ``max_namespaces`` distinct ones (each keeps a store handle and index open)."""
        seen = set(self.memories) | set(self.proxies) | set(self.service.namespaces if self.service else ())
        if namespace not in seen and len(seen) >= self.settings.max_namespaces:
            raise ValidationError(f"this server keeps at most {self.settings.max_namespaces} namespaces open; "
                                  f"{namespace!r} would be one more")

    def memory_for(self, namespace: str) -> Any:
        """The open store handle of ``namespace`` (opened on first use and kept)."""
        with self._lock:
            mem = self.memories.get(namespace)
            if mem is None:
                from memory.store import EditMemory

                self.admit(namespace)
                mem = self.memories[namespace] = EditMemory.open(self.settings.store, create=False,
                                                                 namespace=namespace)
            return mem

    def proxy_for(self, namespace: str) -> Any:
        """Proxy mode: the ContextRouter of ``namespace`` (opened on first use and kept)."""
        with self._lock:
            router = self.proxies.get(namespace)
            if router is None:
                self.admit(namespace)
                router = self.proxies[namespace] = _context_router(self.settings, namespace)
            return router

    def after_write(self) -> None:
        """After a write to the store: the served model follows its folder's weight records (a delete, rollback or
        update may have taken an edit out of them), and with ``consolidate_every`` a consolidation job is queued
        when enough edits are pending (one at a time; a write during a job makes it look again when done)."""
        try:
            self._after_write()
        except Exception:  # the write itself is done; the served model is left as it was
            log.exception("the served model could not follow the store's weight records")

    def _after_write(self) -> None:
        live, every = self.live, self.settings.consolidate_every
        if live is None:
            return
        live.follow()
        if every is None or not live.claim(every):
            return
        s = self.settings
        params = {"every": every, "method": s.consolidate_method, "out": str(live.folder),
                  "settings": s.consolidate_settings, "namespace": s.namespace}

        def run() -> dict[str, Any]:
            from memory.store import EditMemory
            from serve.http.admin import record_json

            records = live.run_due(lambda: EditMemory.open(s.store, create=False, namespace=s.namespace), every,
                                   s.consolidate_method, overrides=s.consolidate_settings, lock=self.weights_lock)
            return {"edits": sum(len(r.edits) for r in records), "folder": str(live.folder),
                    "model_id": live.model_id, "records": [record_json(r) for r in records],
                    "in_weights": len(live.held.versions()), "in_memory": live.pending()}

        self.jobs.submit("auto-consolidate", params, run)

    def close(self) -> None:
        for router in self.proxies.values():
            router.close()
        for mem in self.memories.values():
            mem.close()


def create_app(settings: ServerSettings, *, model: Any = None, tokenizer: Any = None) -> FastAPI:
    """The application for ``settings``; ``model``/``tokenizer`` given in place of loading ``settings.model``."""
    from memory.store import EditMemory

    keys = load_keys(settings.api_keys)
    _check_consolidation(settings)
    memory = EditMemory.open(settings.store, create=False, namespace=settings.namespace)
    service, proxy = None, None
    try:
        if settings.upstream:
            # routing only: the store, its encoder and the scope classifier; no language model is loaded
            proxy = _context_router(settings, settings.namespace)
        elif model is None and settings.model != "none":
            from editors.adaptors import load_edited_model

            model, tokenizer = load_edited_model(settings.model)  # a consolidated folder's GRACE adaptor attached
        if model is not None:
            service = MemoryService(model, tokenizer, settings.store, ServiceSettings(
                method=settings.method, scope=settings.scope, threshold=settings.threshold, k=settings.k,
                options=settings.options, limits=settings.limits, max_batch=settings.max_batch,
                batch_wait=settings.batch_wait, namespace=settings.namespace))
            service.editor()  # open the default method now: a bad scope or option fails at start, not per request
        live = _served_weights(settings, memory, service)
    except BaseException:
        if service is not None:
            service.close()
        memory.close()
        raise
    name = Path(settings.model).name if settings.model not in ("", "none") else "none"
    ctx = Context(settings, memory, service, keys, Metrics(), name, proxy, _upstream_client(settings), live=live)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.jobs.close()
        if ctx.service is not None:
            ctx.service.close()
        if ctx.upstream is not None:
            await ctx.upstream.aclose()
        ctx.close()

    app = FastAPI(title="editmem", version="0.1.0", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.ctx = ctx
    _install_errors(app)
    _install_middleware(app, ctx)

    from serve.http import admin, edits, inference, ops
    from serve.http import proxy as proxy_routes

    app.include_router(proxy_routes.router if ctx.proxy is not None else inference.router)
    app.include_router(edits.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


def _check_consolidation(settings: ServerSettings) -> None:
    """Before anything loads: ``consolidate_every`` is a positive integer, for a local model, with a weight editor."""
    every = settings.consolidate_every
    if every is None:
        return
    from editors.base import available_editors, editor_class
    from editors.retrieval.setup import MemoryEditor
    from memory.checks import check_number

    check_number("serve", "consolidate_every", every, integer=True)
    method = settings.consolidate_method
    if method not in available_editors():
        raise ValidationError(f"unknown editing method {method!r}; available: {', '.join(available_editors())}")
    cls = editor_class(method)
    if issubclass(cls, MemoryEditor):
        raise ValidationError(f"--consolidate-method must be a weight editor (memit, alphaedit, rome, ft) or grace, "
                              f"not {method!r}")
    cls.Settings.with_overrides(cls.Settings(), dict(settings.consolidate_settings))  # a bad setting fails now
    if settings.upstream or settings.model in ("", "none"):
        raise ValidationError("--consolidate-every needs a local model to write the edits into (--model DIR)")
    if settings.consolidate_out is None and not Path(settings.model).expanduser().is_dir():
        raise ValidationError("--consolidate-every needs the edited model folder: serve it as --model DIR, or give "
                              "--consolidate-out DIR (a new folder; the served model becomes its base)")


def _served_weights(settings: ServerSettings, memory: Any, service: MemoryService | None) -> Any:
    """When the served model is an edited model folder of the store (or ``consolidate_every`` names one): the
    router leaves the edits its weights hold to them, and the model object follows the folder's weight records (a
    delete through this server takes the edit out of it too; :class:`editors.consolidation.LiveWeights`, returned),
    taking consolidations in place with ``consolidate_every``; its GRACE adaptor, if any, follows the same way."""
    if service is None:
        return None
    from editors.consolidation import LiveWeights, folder_key, held_edits

    served = held_edits(memory, settings.model)
    if settings.consolidate_every is None and served is None:
        return None
    folder = Path(settings.consolidate_out or settings.model).expanduser()
    if served is not None and memory.get_weight_model(served.model_id).folder != folder_key(folder):
        raise ValidationError(f"--model {settings.model} is another edited model of this store; serve {folder} "
                              "itself, or its base, with --consolidate-out")
    if settings.consolidate_out is None and not memory.weight_models(folder=folder_key(folder)):
        raise ValidationError(f"{folder} is not an edited model of the store {settings.store}; make it one with "
                              "editmem consolidate --out, or give --consolidate-out DIR (a new folder; the served "
                              "model becomes its base)")
    live = LiveWeights.open(memory, service.model, service.tokenizer, folder, base=settings.model,
                            lock=service.batcher.lock)
    service.hold(live.held)
    return live


def _context_router(settings: ServerSettings, namespace: str) -> Any:
    from editors.retrieval.augmented import DEFAULT_CHAT_CONTEXT
    from editors.retrieval.proxy import ContextRouter

    return ContextRouter(settings.store, scope=settings.scope, threshold=settings.threshold, k=settings.k,
                         method=settings.method, ike=settings.options.get("ike"), namespace=namespace,
                         chat_context=settings.options.get("chat_context", DEFAULT_CHAT_CONTEXT))


def _upstream_client(settings: ServerSettings) -> Any:
    if not settings.upstream:
        return None
    import os

    import httpx

    key = settings.upstream_key or os.environ.get("EDITMEM_UPSTREAM_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=settings.upstream.rstrip("/") + "/", headers=headers,
                             timeout=settings.upstream_timeout)


def _install_middleware(app: FastAPI, ctx: Context) -> None:
    from serve.http.middleware import RequestMiddleware

    app.add_middleware(RequestMiddleware, ctx=ctx)
    if ctx.settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(ctx.settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        if first.get("type") == "json_invalid":
            message, code = f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", \
                "invalid_json"
        else:
            message, code = f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}", "invalid_value"
        return JSONResponse(error_body(message, "invalid_request_error", ".".join(loc) or None, code),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(EditmemError)
    async def editmem_error(request: Request, err: EditmemError) -> JSONResponse:
        if isinstance(err, NotFoundError):
            status, kind = 404, "not_found_error"
        elif isinstance(err, (ValidationError, FormatError)):
            status, kind = 400, "invalid_request_error"
        elif isinstance(err, StoreError):
            status, kind = 503, "store_error"
        else:
            status, kind = 400, "invalid_request_error"
        return JSONResponse(error_body(str(err), kind), status_code=status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
