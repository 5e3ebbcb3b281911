"""Transport: the loopback-unless-authenticated bind policy, uvicorn's safe settings (with read
deadlines and a connection cap uvicorn lacks), optional TLS, the drain on SIGTERM, the
engine-to-event-loop mailbox and the server-sent-events response."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import ssl
import sys
import threading
from collections import deque

from starlette.responses import StreamingResponse

from yunque.errors import YunqueError
from yunque.serve.auth import Authenticator
from yunque.serve.config import ServeConfig

log = logging.getLogger(__name__)
_FINAL_GRACE_S = 1.0  # after the drain: what uvicorn's own shutdown still waits before it cancels requests


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
        raise YunqueError(
            f"no authentication configured: no active key in {keys} and no auth.jwt; create a key with "
            f"`yunque keys create --name NAME --keys-file {keys}`, or set auth.required: false (loopback only)"
        )
    if not is_loopback(host) and not (cfg.auth.required and auth.configured):
        raise YunqueError(
            f"refusing to listen on {host}: a non-loopback address needs authentication (auth.required: true and a key or JWT)"  # noqa: E501
        )


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """Both or neither, and loadable as a pair: a user error (exit 2) before the model is loaded,
    not a traceback from uvicorn afterwards."""
    if (certfile is None) != (keyfile is None):
        raise YunqueError("--ssl-certfile and --ssl-keyfile go together: give both (PEM files) or neither")
    if certfile is None:
        return
    for f in (certfile, keyfile):
        if not os.path.isfile(f):
            raise YunqueError(f"{f}: no such file (--ssl-certfile/--ssl-keyfile)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password: an encrypted key fails here instead of prompting on the terminal.
        ctx.load_cert_chain(certfile, keyfile, password=b"")
    except (OSError, ssl.SSLError) as e:
        raise YunqueError(
            f"{certfile} / {keyfile}: cannot load the certificate and its key ({e}); both must be PEM, "
            "the key unencrypted and matching the certificate"
        ) from None


def uvicorn_config(
    app,
    host: str,
    port: int,
    cfg: ServeConfig,
    log_level: str = "info",
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
):
    """uvicorn with the safe settings: h11 (bounded header parsing) with read deadlines and a
    connection cap (`guarded_h11`), keep-alive timeout, no server header, no proxy headers
    trusted, TLS when given a certificate and key."""
    import uvicorn

    L = cfg.limits
    # limit_concurrency: uvicorn's 503 when request tasks (which can outlive their connection)
    # pile up past the connection cap; connections themselves are capped by the protocol.
    protocol = guarded_h11(L.header_timeout_s, L.body_timeout_s, L.max_connections)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=L.keep_alive_s,
        h11_max_incomplete_event_size=2 * L.max_header_bytes + 8192,
        limit_concurrency=L.max_connections + 1,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=cfg.drain_timeout_s,
        log_level=log_level,
        lifespan="on",
        access_log=False,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )


def guarded_h11(header_timeout: float, body_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with what it lacks: a deadline for a request's headers (from the
    connection, or from the first byte of a later request on it) and for its body (from the end
    of the headers), and a cap on open connections. Without them a client that never finishes
    its headers holds its connection, and a file descriptor, for ever. A late connection is
    closed; one past the cap gets a 503 and is closed. A request being answered (generation,
    streaming) has no deadline here."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s"
    )
    body = dumps(
        {
            "error": {
                "message": "The server is at its connection limit; retry shortly",
                "type": "server_overloaded",
                "param": None,
                "code": "overloaded",
            }
        }
    ).encode()

    class GuardedH11Protocol(H11Protocol):
        _phase: str | None = None
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy % (len(body), body))
                transport.close()
                return
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def connection_lost(self, exc) -> None:
            self._arm(None)
            super().connection_lost(exc)

        def _watch(self) -> None:
            state = self.conn.their_state
            self._arm("headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

        def _arm(self, phase: str | None) -> None:
            if phase == self._phase:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._phase, self._timer = phase, None
            if phase is not None:
                self._timer = self.loop.call_later(header_timeout if phase == "headers" else body_timeout, self._late)

        def _late(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def draining_server(config, service, grace_s: float):
    """uvicorn's Server with a drain on SIGTERM/SIGINT (what a container runtime or Kubernetes
    sends before it kills): the service stops admitting generation requests (503 with
    Retry-After; /ready turns 503), the ones in flight run to their end for up to `grace_s`, then
    the server stops and the process exits 0. A second signal ends the drain at once. uvicorn alone
    closes its socket at the signal, so new clients get a refused connection instead of an
    answer, and it re-raises the signal at the end, so the exit status reads as killed."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # From the signal handler (the event loop's thread) or, in tests, from any thread.
            loop = service.mailbox.loop
            if service.draining or loop is None or loop.is_closed():
                # A second signal, or not serving yet: stop now, cutting what is in flight.
                self.config.timeout_graceful_shutdown = 0.1
                self.should_exit = True
                return
            service.draining = True
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

        async def _drain(self) -> None:
            loop = asyncio.get_running_loop()
            log.warning(
                "draining: %d request(s) in flight; new ones get 503 for up to %g s",
                service.in_flight,
                grace_s,
            )
            deadline = loop.time() + grace_s
            while service.in_flight and loop.time() < deadline and not self.should_exit:
                await asyncio.sleep(0.05)
            if self.should_exit:  # a second signal, or the engine gave up: that path set the shutdown's wait
                return
            if service.in_flight:
                log.warning("drain timeout: %d request(s) still in flight are cancelled", service.in_flight)
            # The drain did the waiting: uvicorn's own graceful shutdown only closes what is left.
            self.config.timeout_graceful_shutdown = _FINAL_GRACE_S
            self.should_exit = True

    return DrainingServer(config)


def run_server(
    app,
    host: str,
    port: int,
    cfg: ServeConfig,
    log_level: str = "info",
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, draining first (see `draining_server`); raises (exit code 1)
    if the server stopped because its engine kept failing, so that a supervisor starts a fresh
    process."""
    # The engine thread gives up the GIL inside every torch op and must get it back while the
    # event loop is busy serialising chunks; at the default 5 ms interval each of those hand-backs
    # can stall a decode step. 1 ms keeps steps moving (this process is the server, nothing else).
    sys.setswitchinterval(0.001)

    service = app.app.state.service
    config = uvicorn_config(app, host, port, cfg, log_level, ssl_certfile, ssl_keyfile)
    server = draining_server(config, service, cfg.drain_timeout_s)
    service.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if service.fatal:
        raise YunqueError(f"serving stopped: {service.fatal}", exit_code=1)


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
