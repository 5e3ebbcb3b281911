"""The service behind the routes: one `Service` holds the engine, limiter, guards, metrics and
audit log, admits generation requests and turns the engine's events into OpenAI responses.

Order of work for a generation request, cheapest and safest first: the Gatekeeper (request
id, header cap, auth, requests per minute, body cap) -> schema validation (400) -> model id,
limits from the config, input size (400) -> in a worker thread, within a time budget: input
guard (400 when blocking), chat template + tokenize -> prompt caps (400) -> tokens per minute
(429) -> admission (429 "overloaded", 503 when the engine is down) -> generation, streamed or
not, through the output guard -> usage, metrics, audit line. Every error has OpenAI's shape;
a 500 is a bug or a failure of that request's own generation (non-finite logits).

The event loop only parses, routes and streams: what grows with the input (guards, template,
tokenizer) runs in `_PREP_WORKERS` threads, so /health and other clients are answered while
a large request is being checked. A client that leaves is charged, and audited, for the
tokens generated until it left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from yunque.chat import apply_chat_template
from yunque.errors import ConfigError, YunqueError
from yunque.serve.auth import Principal
from yunque.serve.config import ServeConfig
from yunque.serve.engine import Engine, EngineDown, Overloaded, SeqParams
from yunque.serve.guards import TIMEOUT_RULE, AuditLog, InputGuard, OutputGuard, Verdict
from yunque.serve.limits import RateLimiter, error_body
from yunque.serve.metrics import Metrics
from yunque.serve.schemas import SEED_MAX, ChatCompletionRequest, CompletionRequest
from yunque.serve.server import Mailbox, SSEResponse, dumps

_POLL_S = 0.25  # how often a waiting handler checks that its client is still there (cancel within 1 s)
_PREP_WORKERS = 4  # threads for guards + chat template + tokenizer; more requests wait for one
# A dead engine thread is started again this many times per window; past that the server stops
# (non-zero exit) so that its supervisor starts a fresh process.
_MAX_RESTARTS, _RESTART_WINDOW_S = 3, 600.0
log = logging.getLogger(__name__)
# The route labels of metrics and audit lines: a bounded set, whatever paths clients send.
_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/models": "models",
    "/metrics": "metrics",
    "/health": "health",
    "/openapi.json": "openapi",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str = "invalid_request",
        audited: bool = False,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers, self.reason = headers or {}, reason
        self.audited = audited  # an admitted job's failure: `_finish` wrote its audit line and metrics


@dataclass
class Job:
    """One generation request in flight: its choices, their event queue and its accounting."""

    kind: str  # "chat" | "completion"
    who: Principal
    rid: str
    t0: float
    prompts: list[list[int]]  # one per choice
    n_unique_prompt_tokens: int
    charged: int
    verdict: Verdict
    redactors: list = field(default_factory=list)  # one output-guard stream per choice (None: guard off)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seqs: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    completion_tokens: int = 0
    redactions: dict[str, int] = field(default_factory=dict)
    first_token_at: float | None = None
    status: str = "incomplete"
    accounted: bool = False

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.texts, self.finish = [""] * len(self.prompts), [None] * len(self.prompts)

    def guarded(self, i: int, text: str, final: bool) -> str:
        """Choice `i`'s next text through the output guard, which may hold back a tail until `final`."""
        r = self.redactors[i]
        if r is None:
            return text
        out = r.feed(text) + (r.flush() if final else "")
        for k, v in r.findings.items():
            self.redactions[k] = self.redactions.get(k, 0) + v
        r.findings.clear()
        return out

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.n_unique_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.n_unique_prompt_tokens + self.completion_tokens,
        }


class Service:
    """One server's state (engine, limiter, guards, metrics, audit log) and the work of its routes:
    `chat`, `completion`, `models`, `health`, and `rejected` for every refusal; `lifespan` starts
    and drains the engine."""

    def __init__(self, model, tokenizer, cfg: ServeConfig, model_name: str):
        L = self.limits = cfg.limits
        if L.max_len > model.config.max_position_embeddings:
            raise ConfigError(
                f"limits.max_len: {L.max_len} is past the model's context of "
                f"{model.config.max_position_embeddings} tokens"
            )
        self.cfg, self.tokenizer, self.model_name = cfg, tokenizer, model_name
        self.metrics = Metrics()
        self.engine = Engine(
            model,
            tokenizer,
            L.max_batch,
            L.max_len,
            L.max_queue,
            L.max_prefill_tokens,
            on_step=self._on_step,
            on_death=self._on_engine_death,
        )
        self.limiter = RateLimiter(L.rpm, L.tpm)
        self.in_guard = InputGuard(cfg.guards.input, _special_tokens(tokenizer), cfg.guards.extra_patterns)
        self.out_guard = OutputGuard(cfg.guards.output, cfg.guards.holdback)
        self.audit = AuditLog(cfg.audit.path, cfg.audit.log_prompts)
        self.mailbox = Mailbox()
        self.created = int(time.time())
        self._prep = ThreadPoolExecutor(_PREP_WORKERS, thread_name_prefix="yunque-prep")
        self._deaths: list[float] = []  # when the engine thread died (monotonic), for the restart budget
        self.fatal: str | None = None  # why the server gave up on its engine (then it exits non-zero)
        self.on_fatal = lambda: None  # set by run_server: stop the server

    @asynccontextmanager
    async def lifespan(self, app):
        self.mailbox.loop = asyncio.get_running_loop()
        self.engine.start()
        yield
        # uvicorn has already waited for in-flight requests (graceful shutdown); nothing is left to run
        await asyncio.to_thread(self.engine.stop, self.cfg.drain_timeout_s)
        self._prep.shutdown(wait=False, cancel_futures=True)
        self.audit.close()

    def _on_step(self, e: Engine) -> None:
        self.metrics.queue_depth.set(e.queue_depth)
        self.metrics.running.set(e.n_running)

    def _on_engine_death(self, e: BaseException) -> None:
        """From the dying engine thread (its requests have their errors): restart it on the loop."""
        try:
            self.mailbox.loop.call_soon_threadsafe(self._restart_engine, e)
        except RuntimeError:  # the loop is closed: the server is going away anyway
            pass

    def _restart_engine(self, e: BaseException) -> None:
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < _RESTART_WINDOW_S] + [now]
        if len(self._deaths) <= _MAX_RESTARTS:
            log.warning("restarting the serving engine after %s: %s", type(e).__name__, e)
            self.engine.start()
            return
        self.fatal = (
            f"the engine failed {len(self._deaths)} times in {_RESTART_WINDOW_S:.0f} s, "
            f"last with {type(e).__name__}: {e}"
        )
        log.error("giving up: %s", self.fatal)
        self.on_fatal()

    def health(self) -> tuple[bool, dict]:
        """(serving, body of /health): why not, when the engine is down; restarts so far."""
        e = self.engine
        body: dict = {"status": "ok" if e.error is None else "engine_failed", "engine_restarts": e.restarts}
        if e.error is not None:
            body["error"] = self.fatal or f"the engine thread died ({type(e.error).__name__}: {e.error}); restarting"
        return e.error is None, body

    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "yunque"}
        return {"object": "list", "data": [card]}

    def rejected(self, reason: str, status: int, scope: dict) -> None:
        """Every refusal is counted and audited (who, where, why; never the body)."""
        state = scope.get("state", {})
        who = state.get("principal")
        route = _ROUTES.get(scope.get("path", ""), "other")
        self.metrics.rejections.labels(reason).inc()
        self.metrics.requests.labels(route, str(status)).inc()
        self.audit.write(
            {
                "request_id": state.get("request_id"),
                "key": who.name if who else None,
                "route": route,
                "status": status,
                "outcome": "rejected",
                "reason": reason,
            }
        )

    # -- the two generation routes -----------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_model_and_n(req)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        self._check_size([m["content"] for m in messages] + [m.get("name", "") for m in messages], "messages")
        guarded = [m["content"] for m in messages if m["role"] != "system"]

        def prepare(deadline: float) -> tuple[Verdict, str | None, list[int] | None]:
            verdict = self.in_guard.check(guarded, deadline)
            if verdict.verdict == "block":
                return verdict, None, None
            try:
                text = apply_chat_template(self.tokenizer, messages, add_generation_prompt=True)
            except YunqueError as e:
                raise APIError(400, str(e), param="messages", code="invalid_value") from None
            return verdict, text, self.tokenizer.encode(text)

        verdict, text, ids = await self._offload(prepare)
        self._count_verdict(verdict)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job, max_tokens = self._admit("chat", request, req, [ids], max_tokens, verdict)
        self._submit(job, req, max_tokens)
        return await self._reply(job, req, request, "chat", text)

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        self._check_model_and_n(req)
        prompts = req.prompts()
        self._check_size(prompts, "prompt")
        tok = self.tokenizer

        def prepare(deadline: float) -> tuple[Verdict, list[list[int]] | None]:
            verdict = self.in_guard.check(prompts, deadline)
            if verdict.verdict == "block":
                return verdict, None
            return verdict, [tok.encode(p, add_special_tokens=True) or [tok.bos_id or 0] for p in prompts]

        verdict, ids = await self._offload(prepare)
        self._count_verdict(verdict)
        job, max_tokens = self._admit("completion", request, req, ids, req.max_tokens, verdict)
        self._submit(job, req, max_tokens)
        return await self._reply(job, req, request, "completion", "\n".join(prompts))

    # -- admission -------------------------------------------------------------------------
    def _check_model_and_n(self, req) -> None:
        if req.model != self.model_name:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist; this server serves `{self.model_name}`",
                code="model_not_found",
                param="model",
                reason="invalid_request",
            )
        n = req.n or 1
        if n > self.limits.max_n:
            raise APIError(
                400, f"n: at most {self.limits.max_n} choices per request, got {n}", param="n", code="invalid_value"
            )

    def _check_size(self, texts: list[str], param: str) -> None:
        """Bound the text before any pattern, template or tokenizer sees it."""
        n, cap = sum(map(len, texts)), self.limits.max_input_chars
        if n > cap:
            raise APIError(
                400,
                f"{param}: {n} characters in all, over this server's limit of {cap}",
                param=param,
                code="string_above_max_length",
                reason="input_too_large",
            )

    async def _offload(self, prepare):
        """`prepare(deadline)` in a worker thread, awaited for at most `limits.prep_timeout_s`.
        The input guard stops itself at the deadline (`regex` checks it only now and then, so
        it may run over by seconds); a template or tokenizer that runs over keeps its worker
        until it ends. Either way the request is answered when the budget is spent."""
        budget = self.limits.prep_timeout_s
        deadline = time.monotonic() + budget
        started = []

        def run():
            started.append(True)
            return prepare(deadline)

        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._prep, run), budget)
        except TimeoutError:
            if not started:  # every worker busy for the whole budget
                raise APIError(
                    429,
                    "The server is overloaded (no worker free to check the input); retry shortly",
                    type_="server_overloaded",
                    code="overloaded",
                    headers={"retry-after": "1"},
                    reason="overloaded",
                ) from None
            raise _too_complex(budget) from None

    def _count_verdict(self, v: Verdict) -> None:
        if self.in_guard.mode != "off":
            self.metrics.guard.labels("input", v.verdict).inc()
        if v.verdict == "block" and TIMEOUT_RULE in v.rules:
            raise _too_complex(self.limits.prep_timeout_s)
        if v.verdict == "block":
            raise APIError(
                400,
                f"the input was refused by the prompt-injection guard (rules: {', '.join(v.rules)})",
                code="content_policy_violation",
                param="messages",
                reason="guard_block",
            )

    def _admit(
        self, kind: str, request: Request, req, prompt_ids: list[list[int]], max_tokens: int | None, verdict: Verdict
    ) -> tuple[Job, int]:
        """Check the prompts and max_tokens against the limits, charge the rate limiter: the job and its max_tokens."""
        L, n = self.limits, req.n or 1
        if len(prompt_ids) * n > L.max_n:
            raise APIError(
                400,
                f"{len(prompt_ids)} prompts x n={n} exceeds the limit of {L.max_n} choices",
                param="n",
                code="invalid_value",
            )
        longest = max(len(p) for p in prompt_ids)
        if longest > L.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {longest} tokens, over this server's limit of {L.max_prompt_tokens}",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > L.max_tokens:
            raise APIError(
                400, f"max_tokens: at most {L.max_tokens}, got {max_tokens}", param="max_tokens", code="invalid_value"
            )
        room = L.max_len - longest
        if max_tokens is None:
            max_tokens = min(L.default_max_tokens, room)
        elif max_tokens > room:
            raise APIError(
                400,
                f"this model's context is {L.max_len} tokens; the prompt ({longest}) + "
                f"max_tokens ({max_tokens}) exceed it",
                param="max_tokens",
                code="context_length_exceeded",
            )
        choices = [p for p in prompt_ids for _ in range(n)]
        unique = sum(len(p) for p in prompt_ids)
        charge = unique + max_tokens * len(choices)
        who: Principal = request.scope["state"]["principal"]
        d = self.limiter.take_tokens(who, charge)  # requests per minute: taken by the Gatekeeper already
        if not d.ok:
            if d.reason == "too_large":
                raise APIError(
                    400,
                    f"this request may use {charge} tokens, more than your limit of {d.limit} per minute",
                    code="tokens_exceed_limit",
                    headers=d.headers,
                    reason="rate_limit_tokens",
                )
            retry = max(1, math.ceil(d.retry_after))
            raise APIError(
                429,
                f"Rate limit reached for {d.reason} per minute (limit {d.limit}); retry in {retry}s",
                type_="requests" if d.reason == "requests" else "tokens",
                code="rate_limit_exceeded",
                headers={**d.headers, "retry-after": str(retry)},
                reason=f"rate_limit_{d.reason}",
            )
        job = Job(
            kind,
            who,
            request.scope["state"]["request_id"],
            time.monotonic(),
            choices,
            unique,
            charge,
            verdict,
            redactors=[self.out_guard.stream() for _ in choices],
        )
        request.state.rate_headers = d.headers
        return job, max_tokens

    def _submit(self, job: Job, req, max_tokens: int) -> None:
        def callback(i: int):
            return lambda ev: self.mailbox.post(job.queue, (i, ev))

        temp = 1.0 if req.temperature is None else req.temperature
        params = [
            SeqParams(
                max_tokens,
                temp,
                1.0 if req.top_p is None else req.top_p,
                None if req.seed is None else (req.seed + i) & SEED_MAX,
                req.stops(),
            )
            for i in range(len(job.prompts))
        ]
        try:
            job.seqs = self.engine.submit(job.prompts, params, [callback(i) for i in range(len(job.prompts))])
        except Overloaded as e:
            self.limiter.refund(job.who, job.charged)
            raise APIError(
                429,
                f"The server is overloaded ({e}); retry shortly",
                type_="server_overloaded",
                code="overloaded",
                headers={"retry-after": "1"},
                reason="overloaded",
            ) from None
        except EngineDown as e:
            self.limiter.refund(job.who, job.charged)
            raise APIError(
                503,
                f"The server cannot generate right now ({e}); retry shortly",
                type_="server_error",
                code="engine_unavailable",
                headers={"retry-after": "5"},
                reason="engine_down",
            ) from None

    # -- generation ------------------------------------------------------------------------
    async def _events(self, job: Job, request: Request):
        """Batches of (choice, event) until every choice is done: all that arrived since the last
        batch, so a client that fell behind gets one write, not one per token. Returns early
        (leaving the job unfinished, which cancels it) if the client went away."""
        pending = len(job.seqs)
        checked = time.monotonic()
        while pending:
            try:
                batch = [await asyncio.wait_for(job.queue.get(), _POLL_S)]
            except TimeoutError:
                batch = []
            while not job.queue.empty():
                batch.append(job.queue.get_nowait())
            if time.monotonic() - checked >= _POLL_S:  # also while tokens flow: a busy stream must notice too
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            for i, ev in batch:
                if ev[0] == "error":  # this request's generation failed (the engine goes on)
                    job.status = "failed"
                    raise APIError(
                        500, ev[1], type_="server_error", code="engine_error", reason="engine_error", audited=True
                    )
                if ev[0] == "done":
                    pending -= 1
                    job.finish[i] = ev[1]
                    job.completion_tokens += ev[3]
                elif job.first_token_at is None:
                    job.first_token_at = time.monotonic()
            if batch:
                yield batch

    def _finish(self, job: Job, route: str, status: int, prompt_text: str | None) -> None:
        """Refund, metrics and the audit line, exactly once per admitted job (later calls do nothing)."""
        if job.accounted:
            return
        job.accounted = True
        if job.status == "failed":
            status = 500
        m = self.metrics
        if any(f is None for f in job.finish):
            self.engine.cancel(job.seqs)
            m.cancelled.inc(sum(f is None for f in job.finish))
            job.status = "cancelled" if job.status != "failed" else job.status
            # Charge, count and audit what was generated, also for the choices the client left
            # (or that failed) before their "done": the engine's own count, read now.
            job.completion_tokens = max(job.completion_tokens, sum(s.generated for s in job.seqs))
        self.limiter.refund(job.who, job.charged - job.n_unique_prompt_tokens - job.completion_tokens)
        dt = time.monotonic() - job.t0
        m.requests.labels(route, str(status)).inc()
        m.latency.labels(route).observe(dt)
        if job.first_token_at is not None:
            m.ttft.observe(job.first_token_at - job.t0)
        m.prompt_tokens.inc(job.n_unique_prompt_tokens)
        m.completion_tokens.inc(job.completion_tokens)
        out_verdict = "redacted" if job.redactions else "clean"
        if self.out_guard.on:
            m.guard.labels("output", out_verdict).inc()
        self.audit.write(
            {
                "request_id": job.rid,
                "key": job.who.name,
                "route": route,
                "status": status,
                "outcome": job.status,
                "prompt_tokens": job.n_unique_prompt_tokens,
                "completion_tokens": job.completion_tokens,
                "latency_ms": round(dt * 1000, 1),
                "finish_reasons": job.finish,
                "input_guard": job.verdict.to_dict(),
                "output_guard": {"verdict": out_verdict if self.out_guard.on else "off", "redactions": job.redactions},
            },
            prompt=prompt_text,
            completion=job.texts if self.cfg.audit.log_prompts else None,
        )

    async def _reply(self, job: Job, req, request: Request, route: str, prompt_text: str) -> Response:
        headers = {**request.state.rate_headers, "x-guard-input": job.verdict.verdict}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._stream(job, request, route, prompt_text, include_usage), headers=headers)
        try:
            async for batch in self._events(job, request):
                for i, ev in batch:
                    job.texts[i] += job.guarded(i, ev[1] if ev[0] == "delta" else "", ev[0] == "done")
            if any(f is None for f in job.finish):
                return Response(status_code=499)  # the client left; nobody reads this
            job.status = "ok"
        finally:
            self._finish(job, route, 200, prompt_text)
        choices = [
            (
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
                if job.kind == "chat"
                else {"index": i, "text": t, "logprobs": None, "finish_reason": f}
            )
            for i, (t, f) in enumerate(zip(job.texts, job.finish, strict=True))
        ]
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        return JSONResponse(
            {
                "id": job.id,
                "object": obj,
                "created": int(time.time()),
                "model": self.model_name,
                "choices": choices,
                "usage": job.usage(),
            },
            headers=headers,
        )

    async def _stream(self, job: Job, request: Request, route: str, prompt_text: str, include_usage: bool):
        """The server-sent events of a streamed job, ending with `data: [DONE]`."""
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"

        def event(choices: list[dict], usage: dict | None = None) -> str:
            body = {
                "id": job.id,
                "object": obj,
                "created": int(time.time()),
                "model": self.model_name,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = usage
            return "data: " + dumps(body) + "\n\n"

        def chunk(i: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if job.kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                return event([{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}])
            return event([{"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}])

        try:
            if job.kind == "chat":
                for i in range(len(job.prompts)):
                    yield chunk(i, None, None, role=True)
            async for batch in self._events(job, request):
                out: list[str] = []
                texts: dict[int, str] = {}  # consecutive deltas of a choice become one chunk
                for i, ev in batch:
                    text = job.guarded(i, ev[1] if ev[0] == "delta" else "", ev[0] == "done")
                    job.texts[i] += text
                    texts[i] = texts.get(i, "") + text
                    if ev[0] == "done":
                        tail = texts.pop(i)
                        if tail:
                            out.append(chunk(i, tail, None))
                        out.append(chunk(i, None, ev[1]))
                out += [chunk(i, t, None) for i, t in texts.items() if t]
                if out:
                    yield "".join(out)
            if any(f is None for f in job.finish):
                return
            if include_usage:
                yield event([], job.usage())
            job.status = "ok"
            self._finish(job, route, 200, prompt_text)  # accounted before the client can see the end
            yield "data: [DONE]\n\n"
        except APIError as e:  # headers are gone: report in-band, as OpenAI does
            yield "data: " + dumps(error_body(e.message, e.type, e.code)) + "\n\n"
        finally:
            self._finish(job, route, 200, prompt_text)


def _too_complex(budget: float) -> APIError:
    return APIError(
        400,
        f"the input could not be checked and tokenized within this server's time budget of "
        f"{budget:g} s; send a shorter or simpler input",
        code="input_too_complex",
        reason="prep_timeout",
    )


def _special_tokens(tokenizer) -> set[str]:
    """Special tokens (chat-template markers) a user must not be able to write into a prompt.
    yunque's Tokenizer has no public accessor for them yet, hence the private attribute."""
    rust = getattr(tokenizer, "_rust", None)
    if rust is None:
        return set(tokenizer.special_tokens.values())
    return {t.content for t in rust.get_added_tokens_decoder().values() if t.special}
