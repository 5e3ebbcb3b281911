"""Transport: the loopback-unless-authenticated bind policy, uvicorn's safe settings, the
engine-to-event-loop mailbox and the server-sent-events response."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import threading
from collections import deque

from starlette.responses import StreamingResponse

from yunque.errors import YunqueError
from yunque.serve.auth import Authenticator
from yunque.serve.config import ServeConfig


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere, so it counts as exposed


def check_bind(host: str, cfg: ServeConfig, auth: Authenticator) -> None:
    """Refuse unsafe setups before anything is loaded."""
    keys = cfg.auth.keys_file
    if cfg.auth.required and not auth.configured:
        raise YunqueError(f"no authentication configured: no active key in {keys} and no auth.jwt; create a key with "
                          f"`yunque keys create --name NAME --keys-file {keys}`, or set auth.required: false (loopback only)")
    if not is_loopback(host) and not (cfg.auth.required and auth.configured):
        raise YunqueError(f"refusing to listen on {host}: a non-loopback address needs authentication (auth.required: true and a key or JWT)")


def uvicorn_config(app, host: str, port: int, cfg: ServeConfig, log_level: str = "info"):
    """uvicorn with the safe settings: h11 (bounded header parsing), no server header, no proxy
    headers trusted, graceful drain of in-flight requests on SIGTERM/SIGINT."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http="h11", h11_max_incomplete_event_size=2 * cfg.limits.max_header_bytes + 8192,
                          server_header=False, proxy_headers=False, timeout_graceful_shutdown=cfg.drain_timeout_s,
                          log_level=log_level, lifespan="on", access_log=False)


def run_server(app, host: str, port: int, cfg: ServeConfig, log_level: str = "info") -> None:
    import uvicorn

    # The engine thread gives up the GIL inside every torch op and must get it back while the
    # event loop is busy serialising chunks; at the default 5 ms interval each of those hand-backs
    # can stall a decode step. 1 ms keeps steps moving (this process is the server, nothing else).
    sys.setswitchinterval(0.001)

    uvicorn.Server(uvicorn_config(app, host, port, cfg, log_level)).run()


class Mailbox:
    """Engine thread -> event loop: every event of a decode step is delivered with one wake-up
    of the loop (one `call_soon_threadsafe`), not one per sequence."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening
            pass

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is always closed when the response ends, so a client
    that disconnects stops its generation now rather than whenever the generator is collected."""

    def __init__(self, gen, headers: dict[str, str]):
        super().__init__(gen, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
