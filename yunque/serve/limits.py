"""Rate limits per caller and the size gate in front of every route.

`RateLimiter`: two token buckets per caller, requests/minute and tokens/minute, each full at
start and refilled continuously. A generation request takes its request before its body is
read (`take_request`), so a flood of costly requests is refused before any of their work; once
its prompt is tokenized it is charged `prompt + max_tokens x n` tokens (`take_tokens`; it
cannot be known sooner what it will use) and the part it did not generate is refunded when it
finishes or its client leaves. Exactly `rpm` requests pass in a burst; the next gets 429 with
Retry-After.

`Gatekeeper`: pure ASGI middleware, outermost, cheapest check first: gives every response an
`x-request-id`, answers 431 when the request headers exceed the cap, 401 without valid
credentials (every path but the public ones, unknown paths included, so nothing is learned
without a key), 429 past the caller's requests per minute (generation routes), then 413 when
the body exceeds its cap (read in full, bounded, before any route runs). All errors in
OpenAI's shape.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from yunque.serve.auth import Principal


class TokenBucket:
    def __init__(self, capacity: float, now: float):
        self.capacity, self.rate = float(capacity), capacity / 60.0  # per second
        self.level, self.t = float(capacity), now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_for(self, n: float) -> float:
        """Seconds until `n` can be taken (0 when it can now)."""
        return max(0.0, (n - self.level) / self.rate)


@dataclass
class Decision:
    ok: bool
    headers: dict[str, str] = field(default_factory=dict)
    retry_after: float = 0.0
    reason: str = ""  # "requests" | "tokens" | "too_large"
    limit: int = 0


class RateLimiter:
    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic, max_callers: int = 10_000):
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self._buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_callers = max_callers  # JWT subjects are unbounded: forget the least recent (it starts full again)

    def _get(self, who: Principal, now: float) -> tuple[TokenBucket, TokenBucket]:
        b = self._buckets.get(who.name)
        rpm, tpm = who.rpm or self.rpm, who.tpm or self.tpm
        if b is None or b[0].capacity != rpm or b[1].capacity != tpm:
            b = (TokenBucket(rpm, now), TokenBucket(tpm, now))
            self._buckets[who.name] = b
            if len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(who.name)
        b[0].refill(now)
        b[1].refill(now)
        return b

    def acquire(self, who: Principal, tokens: int) -> Decision:
        with self._lock:
            now = self.clock()
            req, tok = self._get(who, now)
            if tokens > tok.capacity:
                return Decision(False, self._headers(req, tok), reason="too_large", limit=int(tok.capacity))
            wait = max(req.wait_for(1), tok.wait_for(tokens))
            if wait > 0:
                reason = "requests" if req.wait_for(1) > 0 else "tokens"
                return Decision(
                    False,
                    self._headers(req, tok),
                    retry_after=wait,
                    reason=reason,
                    limit=int(req.capacity if reason == "requests" else tok.capacity),
                )
            req.level -= 1
            tok.level -= tokens
            return Decision(True, self._headers(req, tok))

    def take_request(self, who: Principal) -> Decision:
        """One request from the caller's requests-per-minute bucket (tokens come later)."""
        with self._lock:
            req, tok = self._get(who, self.clock())
            wait = req.wait_for(1)
            if wait > 0:
                return Decision(
                    False, self._headers(req, tok), retry_after=wait, reason="requests", limit=int(req.capacity)
                )
            req.level -= 1
            return Decision(True, self._headers(req, tok))

    def take_tokens(self, who: Principal, tokens: int) -> Decision:
        """`tokens` from the caller's tokens-per-minute bucket (its request was taken already)."""
        with self._lock:
            req, tok = self._get(who, self.clock())
            if tokens > tok.capacity:
                return Decision(False, self._headers(req, tok), reason="too_large", limit=int(tok.capacity))
            wait = tok.wait_for(tokens)
            if wait > 0:
                return Decision(
                    False, self._headers(req, tok), retry_after=wait, reason="tokens", limit=int(tok.capacity)
                )
            tok.level -= tokens
            return Decision(True, self._headers(req, tok))

    def state(self, who: Principal) -> dict:
        """The caller's buckets now (limit, remaining, seconds until full), taking nothing."""
        with self._lock:
            req, tok = self._get(who, self.clock())
            return {
                name: {
                    "limit": int(b.capacity),
                    "remaining": max(0, math.floor(b.level)),
                    "reset_s": round((b.capacity - b.level) / b.rate, 3),
                }
                for name, b in (("requests", req), ("tokens", tok))
            }

    def refund(self, who: Principal, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            b = self._buckets.get(who.name)
            if b is not None:
                b[1].level = min(b[1].capacity, b[1].level + tokens)

    @staticmethod
    def _headers(req: TokenBucket, tok: TokenBucket) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(int(req.capacity)),
            "x-ratelimit-remaining-requests": str(max(0, math.floor(req.level))),
            "x-ratelimit-reset-requests": f"{(req.capacity - req.level) / req.rate:.3f}s",
            "x-ratelimit-limit-tokens": str(int(tok.capacity)),
            "x-ratelimit-remaining-tokens": str(max(0, math.floor(tok.level))),
            "x-ratelimit-reset-tokens": f"{(tok.capacity - tok.level) / tok.rate:.3f}s",
        }


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_SAFE_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")


class Gatekeeper:
    """ASGI middleware: x-request-id on everything, header cap (431), body cap (413)."""

    def __init__(
        self,
        app,
        max_header_bytes: int,
        max_body_bytes: int,
        authenticate: Callable[[str | None], Principal | None],
        public_paths: frozenset[str] = frozenset({"/health"}),
        on_reject: Callable[[str, int, dict], None] | None = None,
        take_request: Callable[[Principal], Decision] | None = None,
        limited_paths: frozenset[str] = frozenset(),
        public: Callable[[str], bool] = lambda path: False,
    ):
        self.app, self.max_header_bytes, self.max_body_bytes = app, max_header_bytes, max_body_bytes
        self.authenticate, self.public_paths, self.public = authenticate, public_paths, public  # public: the web page
        self.on_reject = on_reject or (lambda reason, status, scope: None)  # for metrics and the audit log
        self.take_request, self.limited_paths = take_request, limited_paths  # requests per minute, on POSTs there

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _SAFE_ID.fullmatch(given) else "req-" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rid.encode())]}
            await send(message)

        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + len(scope.get("raw_path") or b"")
        if header_bytes > self.max_header_bytes:
            self.on_reject("headers_too_large", 431, scope)
            return await self._error(
                send_with_id,
                431,
                f"request headers are {header_bytes} bytes, over the limit of {self.max_header_bytes}",
                "request_headers_too_large",
            )
        if scope["path"] not in self.public_paths and not self.public(scope["path"]):
            auth = [v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]
            # no header: the authenticator decides (anonymous when auth is off); two: ambiguous, refused
            who = self.authenticate(auth[0] if auth else None) if len(auth) <= 1 else None
            if who is None:
                self.on_reject("auth", 401, scope)
                return await self._error(
                    send_with_id,
                    401,
                    "Incorrect or missing API key or token: send `Authorization: Bearer <key>`",
                    "invalid_api_key",
                    [(b"www-authenticate", b"Bearer")],
                )
            scope["state"]["principal"] = who
            if self.take_request is not None and scope["method"] == "POST" and scope["path"] in self.limited_paths:
                d = self.take_request(who)
                if not d.ok:
                    self.on_reject("rate_limit_requests", 429, scope)
                    retry = max(1, math.ceil(d.retry_after))
                    extra = [(k.encode(), v.encode()) for k, v in {**d.headers, "retry-after": str(retry)}.items()]
                    return await self._error(
                        send_with_id,
                        429,
                        f"Rate limit reached for requests per minute (limit {d.limit}); retry in {retry}s",
                        "rate_limit_exceeded",
                        extra,
                        "requests",
                    )
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            self.on_reject("body_too_large", 413, scope)
            return await self._error(
                send_with_id, 413, f"request body over the limit of {self.max_body_bytes} bytes", "request_too_large"
            )
        body = bytearray()
        more = scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                self.on_reject("body_too_large", 413, scope)
                return await self._error(
                    send_with_id,
                    413,
                    f"request body over the limit of {self.max_body_bytes} bytes",
                    "request_too_large",
                )
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: wait for the client's disconnect, as the server would

        await self.app(scope, replay, send_with_id)

    @staticmethod
    async def _error(
        send, status: int, message: str, code: str, extra: list | None = None, type_: str | None = None
    ) -> None:
        type_ = type_ or ("authentication_error" if status == 401 else "invalid_request_error")
        payload = json.dumps(error_body(message, type_, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
        await send({"type": "http.response.body", "body": payload})
