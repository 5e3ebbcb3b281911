"""The web page of `yunque serve` at /ui/ (chat playground, model card, training runs, server
health) and the small JSON routes it reads besides the OpenAI ones.

The page is plain files shipped in yunque/serve/ui (no build step, no third-party origin, nothing
fetched at run time) and is public, like /health: it holds nothing. Everything it shows comes from
calls that carry the API key, which the page keeps in sessionStorage and sends as a bearer header;
the routes here sit behind the same Gatekeeper as /v1 (401 without a key). The page's responses
carry a strict Content-Security-Policy (scripts and styles from this origin only, no inline
script, `connect-src 'self'`), nosniff and no-referrer; model output is put into the page as
text, never as HTML.

    GET /yunque/card          what is served and where it came from (yunque.serve.card)
    GET /yunque/card/verify   the recorded SHA-256 of the served files, checked now
    GET /yunque/status        engine, queue, running sequences, token counters, the caller's rate limits
    GET /yunque/runs[/NAME]   `--runs DIR`: the runs, or one run's curves, evals and red-team report
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from yunque.serve.card import ModelCard
from yunque.serve.limits import error_body
from yunque.serve.runs import RunsDir

PUBLIC_PREFIX = "/ui"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-cache",
}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


def is_public(path: str) -> bool:
    """The page's own files need no key (the Gatekeeper lets them through)."""
    return path == PUBLIC_PREFIX or path.startswith(PUBLIC_PREFIX + "/")


def load_assets(auth_required: bool, runs: bool) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) of every file of the page, read once. index.html is told (in
    meta tags) whether auth is on and whether there is a runs directory."""
    assets = {}
    for f in (resources.files("yunque.serve") / "ui").iterdir():
        kind = _TYPES.get(f.name[f.name.rfind(".") :]) if "." in f.name else None
        if kind is not None and f.is_file():
            assets[f.name] = (f.read_bytes(), kind)
    index = assets["index.html"][0].decode("utf-8")
    index = index.replace("{{auth}}", "on" if auth_required else "off").replace("{{runs}}", "on" if runs else "off")
    assets["index.html"] = (index.encode("utf-8"), _TYPES[".html"])
    return assets


def add_ui(app: FastAPI, service, card: ModelCard, runs: RunsDir | None, auth_required: bool) -> None:
    """The page's routes and JSON routes on `app` (left out entirely with `--ui off`)."""
    assets = load_assets(auth_required, runs is not None)

    def asset(name: str) -> Response:
        if name not in assets:
            return JSONResponse(
                error_body(f"/ui/{name[:100]}: no such file", "invalid_request_error", "not_found"),
                status_code=404,
                headers=HEADERS,
            )
        body, kind = assets[name]
        return Response(body, media_type=kind, headers=HEADERS)

    @app.get("/ui", include_in_schema=False)
    async def ui_root():
        return RedirectResponse("/ui/", status_code=308, headers=HEADERS)

    @app.get("/ui/", include_in_schema=False)
    async def ui_index():
        return asset("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str):
        return asset(name)

    @app.get("/yunque/card", include_in_schema=False)
    async def model_card():
        return card.facts()

    @app.get("/yunque/card/verify", include_in_schema=False)
    async def verify_card():
        return await asyncio.to_thread(card.verify)

    @app.get("/yunque/status", include_in_schema=False)
    async def status(request: Request):
        return server_status(service, request.scope["state"]["principal"])

    @app.get("/yunque/runs", include_in_schema=False)
    async def runs_list():
        if runs is None:
            return _no_runs()
        return await asyncio.to_thread(runs.listing)

    @app.get("/yunque/runs/{name}", include_in_schema=False)
    async def run(name: str):
        if runs is None:
            return _no_runs()
        found = await asyncio.to_thread(runs.run, name)
        if found is None:
            return _not_found(f"no run named {name[:100]!r} in the runs directory")
        return found


def _not_found(message: str) -> JSONResponse:
    return JSONResponse(error_body(message, "invalid_request_error", "not_found"), status_code=404)


def _no_runs() -> JSONResponse:
    return _not_found("this server has no runs directory: start it with `yunque serve --runs DIR`")


def server_status(service, who) -> dict:
    """Health for the page: the engine, its queue and batch, token counters (the page turns them
    into tokens/s between two polls) and the caller's rate-limit buckets."""
    health = service.health()
    health["ready"] = service.ready()[1]["status"]  # ready, starting, draining or engine_failed
    e, reg = service.engine, service.metrics.registry

    def counter(name: str) -> float:
        return reg.get_sample_value(name) or 0.0

    return {
        "engine": health,
        "queue_depth": e.queue_depth,
        "max_queue": e.max_queue,
        "running": e.n_running,
        "max_batch": e.max_batch,
        "completion_tokens": counter("yunque_completion_tokens_total"),
        "prompt_tokens": counter("yunque_prompt_tokens_total"),
        "cancelled": counter("yunque_cancelled_sequences_total"),
        "time": time.time(),
        "key": who.name,
        "rate_limit": service.limiter.state(who),
    }
