"""The ASGI app: the Gatekeeper in front of thin FastAPI routes over a `Service`.

The routes only parse (FastAPI validates bodies against yunque.serve.schemas) and hand over;
admission, generation and accounting are the Service's. Every error has OpenAI's shape.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from yunque.serve.auth import Authenticator
from yunque.serve.card import ModelCard
from yunque.serve.config import ServeConfig
from yunque.serve.limits import Gatekeeper, error_body
from yunque.serve.runs import RunsDir
from yunque.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ErrorResponse
from yunque.serve.service import APIError, Service
from yunque.serve.webui import add_ui, is_public

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 431, 500, 503)}
# rate limited before the body is read, refused while draining, counted in flight
_GENERATION = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_PROBES = frozenset({"/health", "/ready"})  # no credentials: probes (Docker, Kubernetes, a proxy) carry none


def create_app(
    model,
    tokenizer,
    cfg: ServeConfig,
    model_name: str,
    auth: Authenticator,
    *,
    ui: bool = True,
    model_dir: Path | None = None,
    adapter: Path | None = None,
    runs_dir: Path | None = None,
) -> Gatekeeper:
    """The app; `ui` adds the web page at /ui/ and its JSON routes (model card of `model_dir` +
    `adapter`, server status, the training runs in `runs_dir`)."""
    service = Service(model, tokenizer, cfg, model_name)
    # made before the routes: the `model` route function below rebinds the name `model`
    card = ModelCard(model, model_name, model_dir, adapter, cfg.dtype) if ui else None
    app = FastAPI(
        title="yunque",
        version="1",
        lifespan=service.lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        description="OpenAI-compatible inference. Every route except /health and /ready needs "
        "`Authorization: Bearer <key>`.",
    )
    app.add_middleware(InFlight, service=service)
    app.state.service = service
    app.state.engine, app.state.metrics, app.state.limiter = service.engine, service.metrics, service.limiter
    _error_handlers(app, service)

    @app.get("/health", include_in_schema=True)
    async def health():
        """Liveness: 200 while the process answers; the body says how its engine is."""
        return JSONResponse(service.health())

    @app.get("/ready", include_in_schema=True, responses={503: {"description": "starting, draining or engine down"}})
    async def ready():
        """Readiness: 200 when this server should get traffic (started, engine running, not draining), else 503."""
        ok, body = service.ready()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", responses=_ERRORS)
    async def prom_metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=_ERRORS)
    async def models():
        return service.models()

    @app.get("/v1/models/{model_id:path}", responses=_ERRORS)
    async def model(model_id: str):
        return service.model(model_id)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return JSONResponse(app.openapi())

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await service.chat(req, request)

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        return await service.completion(req, request)

    @app.post("/v1/embeddings", responses=_ERRORS)
    async def embeddings(req: EmbeddingRequest, request: Request):
        return await service.embeddings(req, request)

    if ui:
        add_ui(app, service, card, RunsDir(runs_dir) if runs_dir is not None else None, cfg.auth.required)

    return Gatekeeper(
        app,
        cfg.limits.max_header_bytes,
        cfg.limits.max_body_bytes,
        auth.authenticate,
        on_reject=service.rejected,
        public_paths=_PROBES,
        take_request=service.limiter.take_request,
        limited_paths=_GENERATION,
        public=is_public if ui else (lambda path: False),
    )


class InFlight:
    """ASGI middleware: counts the generation requests being answered, to the end of a stream
    (the route returns before its stream is sent), so that a drain knows when they are done."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in _GENERATION:
            return await self.app(scope, receive, send)
        self.service.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.service.in_flight -= 1


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


def _error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if not e.audited:
            service.rejected(e.reason, e.status, request.scope)
        return _error(e.status, e.message, e.type, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        # Drop "body" and pydantic's union-branch tags ("function-after[...]", "list[TextPart]"): keep field paths.
        loc = [
            str(p)
            for p in first.get("loc", ())
            if p != "body" and not any(c in str(p) for c in "[(") and str(p) not in ("str", "int", "float", "bool")
        ]
        service.rejected("invalid_request", 400, request.scope)
        where = ".".join(loc)
        return _error(
            400,
            f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}",
            param=where or None,
            code="invalid_value",
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        return _error(500, "internal server error", type_="server_error", code="internal_error")
