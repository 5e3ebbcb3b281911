"""The service behind the routes: one `Service` holds the engine, limiter, guards, metrics and
audit log, admits generation requests and turns the engine's events into OpenAI responses.

Order of work for a generation request, cheapest and safest first: the Gatekeeper (request
id, header cap, auth, requests per minute, body cap) -> schema validation (400) -> model id,
limits from the config, input size (400) -> in a worker thread, within a time budget: input
guard (400 when blocking), chat template (with `tools`) + tokenize, grammar of a JSON
response_format or forced tool call -> prompt caps (400) -> tokens per minute (429) -> admission
(429 "overloaded", 503 when the engine is down) -> generation, streamed or not, through the
output guard, then the tool-call parser -> usage, metrics, audit line. Every error has OpenAI's
shape; a 500 is a bug or a failure of that request's own generation (non-finite logits).
/v1/embeddings takes the same path up to admission, then one packed forward in the engine.

The pieces of the newer OpenAI fields live in their own modules: `logprobs` (the two response
shapes), `tools` (template messages, call parsing), `grammar` (xgrammar), `embeddings` (pooling).

The event loop only parses, routes and streams: what grows with the input (guards, template,
tokenizer) runs in `_PREP_WORKERS` threads, so /health and other clients are answered while
a large request is being checked. A client that leaves is charged, and audited, for the
tokens generated until it left.

/health says the process is alive (200 while it answers at all, the engine's state in the body);
/ready says it should get traffic: started, engine thread running, not draining. On SIGTERM the
server drains (yunque.serve.server.draining_server): generation requests get 503 with
Retry-After while the ones in flight (`in_flight`, counted to the end of their streams) finish.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from yunque.chat import apply_chat_template
from yunque.errors import ConfigError, YunqueError
from yunque.serve import embeddings, logprobs, tools
from yunque.serve.auth import Principal
from yunque.serve.config import ServeConfig
from yunque.serve.engine import Engine, EngineDown, Overloaded, SeqParams
from yunque.serve.grammar import Grammar, GrammarError, Grammars
from yunque.serve.guards import TIMEOUT_RULE, AuditLog, InputGuard, OutputGuard, Verdict
from yunque.serve.limits import RateLimiter, error_body
from yunque.serve.metrics import Metrics
from yunque.serve.schemas import SEED_MAX, ChatCompletionRequest, CompletionRequest, EmbeddingRequest
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
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/metrics": "metrics",
    "/health": "health",
    "/ready": "ready",
    "/openapi.json": "openapi",
}


def _route(path: str) -> str:
    if path.startswith(("/ui", "/yunque/")):
        return "ui"  # the web page and its JSON routes
    return _ROUTES.get(path) or ("models" if path.startswith("/v1/models/") else "other")


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
    top_logprobs: int | None = None  # None: no logprobs asked for
    tool_names: list[str] | None = None  # parse tool calls out of the text (chat with tools)
    one_call: bool = False  # parallel_tool_calls: false: the first call only

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        n = len(self.prompts)
        self.texts, self.finish = [""] * n, [None] * n
        self.logprobs: list[list] = [[] for _ in range(n)]  # the engine's entries, per choice
        self.redacted = [False] * n
        self.calls: list[list[dict]] = [[] for _ in range(n)]
        self.tool_streams = None  # chat with tools: what may be a call is held back while streaming
        if self.tool_names:
            self.tool_streams = [tools.ToolStream(self.tool_names, self.one_call) for _ in range(n)]

    def guarded(self, i: int, text: str, final: bool) -> str:
        """Choice `i`'s next text through the output guard, which may hold back a tail until `final`."""
        r = self.redactors[i]
        if r is None:
            return text
        out = r.feed(text) + (r.flush() if final else "")
        for k, v in r.findings.items():
            self.redactions[k] = self.redactions.get(k, 0) + v
            self.redacted[i] = True
        r.findings.clear()
        return out

    def finish_reason(self, i: int) -> str | None:
        return "tool_calls" if self.calls[i] and self.finish[i] in ("stop", "length") else self.finish[i]

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.n_unique_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.n_unique_prompt_tokens + self.completion_tokens,
        }


class Service:
    """One server's state (engine, limiter, guards, metrics, audit log) and the work of its routes:
    `chat`, `completion`, `embeddings`, `models`, `health`, `ready`, and `rejected` for every
    refusal; `lifespan` starts and stops the engine."""

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
        self.token_texts = logprobs.TokenTexts(tokenizer)
        self.grammars = Grammars(tokenizer, model.config.vocab_size)
        self._call_format: str | None = ""  # how the chat template writes tool calls ("": not found out yet)
        self.started = False  # the lifespan has started the engine
        self.draining = False  # SIGTERM: no new generation requests, the ones in flight finish
        self.in_flight = 0  # generation requests being answered (see `count_in_flight`)

    @asynccontextmanager
    async def lifespan(self, app):
        self.mailbox.loop = asyncio.get_running_loop()
        self.engine.start()
        threading.Thread(target=self.grammars.warm, name="yunque-grammar", daemon=True).start()
        self.started = True
        yield
        self.started = False
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

    def health(self) -> dict:
        """The body of /health (the process is alive: always 200): the engine's state, restarts so far."""
        e = self.engine
        body: dict = {"status": "ok" if e.error is None else "engine_failed", "engine_restarts": e.restarts}
        if e.error is not None:
            body["error"] = self.fatal or f"the engine thread died ({type(e.error).__name__}: {e.error}); restarting"
        return body

    def ready(self) -> tuple[bool, dict]:
        """(ready, body of /ready): whether this server should get traffic now, and if not, why."""
        e = self.engine
        if self.draining:
            status = "draining"
        elif not self.started:
            status = "starting"
        elif e.error is not None or not e.alive:
            status = "engine_failed"
        else:
            status = "ready"
        body = {"status": status}
        if status == "engine_failed" and "error" in (h := self.health()):
            body["error"] = h["error"]
        return status == "ready", body

    def _check_admitting(self) -> None:
        if self.draining:
            raise APIError(
                503,
                "The server is shutting down and takes no new requests; retry (another replica) shortly",
                type_="server_error",
                code="shutting_down",
                headers={"retry-after": "5"},
                reason="draining",
            )

    def models(self) -> dict:
        return {"object": "list", "data": [self.model(self.model_name)]}

    def model(self, model_id: str) -> dict:
        """GET /v1/models/{id}: the card of the one model served, 404 for any other id."""
        if model_id != self.model_name:
            raise self._unknown_model(model_id)
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "yunque"}

    def _unknown_model(self, model_id: str) -> APIError:
        return APIError(
            404,
            f"The model `{model_id}` does not exist; this server serves `{self.model_name}`",
            code="model_not_found",
            param="model",
            reason="invalid_request",
        )

    def rejected(self, reason: str, status: int, scope: dict) -> None:
        """Every refusal is counted and audited (who, where, why; never the body)."""
        state = scope.get("state", {})
        who = state.get("principal")
        route = _route(scope.get("path", ""))
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

    # -- the routes ---------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_admitting()
        self._check_model_and_n(req)
        messages = tools.template_messages(req.messages)
        # tool_choice "none": the tools stay out of the prompt and nothing is parsed as a call
        tool_defs = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
        calls = [c.function for m in req.messages for c in m.tool_calls or []]
        said = [m["content"] for m in messages] + [m.get("name", "") for m in messages]
        self._check_size(said + [c.arguments for c in calls] + [dumps(t) for t in tool_defs], "messages")
        guarded = [m["content"] for m in messages if m["role"] != "system"] + [c.arguments for c in calls]

        def prepare(deadline: float) -> tuple[Verdict, str | None, list[int] | None, Grammar | None]:
            if (tool_defs or calls) and self._tool_format() is None:
                raise APIError(
                    400,
                    "this model's chat template has no tool support (it does not render `tools` or an "
                    "assistant's tool calls); send the request without tools",
                    param="tools" if tool_defs else "messages",
                    code="tools_not_supported",
                )
            verdict = self.in_guard.check(guarded, deadline)
            if verdict.verdict == "block":
                return verdict, None, None, None
            try:
                text = apply_chat_template(
                    self.tokenizer, messages, add_generation_prompt=True, tools=tool_defs or None
                )
            except YunqueError as e:
                raise APIError(400, str(e), param="messages", code="invalid_value") from None
            return verdict, text, self.tokenizer.encode(text), self._grammar(req, tool_defs)

        verdict, text, ids, grammar = await self._offload(prepare)
        self._count_verdict(verdict)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        names = [t["function"]["name"] for t in tool_defs]
        job, max_tokens = self._admit("chat", request, req, [ids], max_tokens, verdict, names or None)
        self._submit(job, req, max_tokens, grammar)
        return await self._reply(job, req, request, "chat", text)

    def _tool_format(self) -> str | None:
        if self._call_format == "":
            self._call_format = tools.call_format(self.tokenizer)
        return self._call_format

    def _grammar(self, req: ChatCompletionRequest, tool_defs: list[dict]) -> Grammar | None:
        """The constraint of a forced tool call or a JSON response_format (None: free text)."""
        rf, forced = req.response_format, req.forces_tool_call()
        try:
            if forced:
                choice = req.tool_choice if isinstance(req.tool_choice, str) else req.tool_choice.model_dump()
                return self.grammars.tool_call(self._tool_format(), tool_defs, choice)
            if rf is None or rf.type == "text":
                return None
            if rf.type == "json_object":
                return self.grammars.json_object()
            return self.grammars.json_schema(rf.json_schema.schema_, bool(rf.json_schema.strict))
        except GrammarError as e:
            param = "tool_choice" if forced else "response_format"
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        self._check_admitting()
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

    async def embeddings(self, req: EmbeddingRequest, request: Request) -> Response:
        """POST /v1/embeddings: the same gate, guard, token limits, metrics and audit as generation."""
        self._check_admitting()
        if req.model != self.model_name:
            raise self._unknown_model(req.model)
        hidden = self.engine.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(
                400,
                f"dimensions: this model's embeddings have {hidden} dimensions and cannot be shortened",
                param="dimensions",
                code="invalid_value",
            )
        inputs, L = req.inputs(), self.limits
        if len(inputs) > L.max_embedding_inputs:
            raise APIError(
                400,
                f"input: at most {L.max_embedding_inputs} inputs per request, got {len(inputs)}",
                param="input",
                code="invalid_value",
            )
        V = self.engine.vocab_size
        if any(t < 0 or t >= V for x in inputs if not isinstance(x, str) for t in x):
            raise APIError(400, f"input: token ids must be in [0, {V})", param="input", code="invalid_value")
        self._check_size([x for x in inputs if isinstance(x, str)], "input")
        tok = self.tokenizer

        def prepare(deadline: float) -> tuple[Verdict, list[list[int]] | None]:
            # Token ids are checked as the text they spell. Their special tokens (a BOS) are left out: an
            # embedding has no turns to forge, and ids name those tokens on purpose, not by a typed string.
            texts = [x if isinstance(x, str) else tok.decode(x, skip_special_tokens=True) for x in inputs]
            verdict = self.in_guard.check(texts, deadline)
            if verdict.verdict == "block":
                return verdict, None
            return verdict, [tok.encode(x, add_special_tokens=True) if isinstance(x, str) else x for x in inputs]

        verdict, ids = await self._offload(prepare)
        self._count_verdict(verdict, "input")
        return await self._embed(request, req.encoding_format, ids, verdict)

    async def _embed(self, request: Request, encoding_format: str, ids: list[list[int]], verdict: Verdict) -> Response:
        longest = max(map(len, ids))
        if longest > self.limits.max_prompt_tokens:
            raise APIError(
                400,
                f"an input has {longest} tokens, over this server's limit of {self.limits.max_prompt_tokens}",
                param="input",
                code="context_length_exceeded",
            )
        n_tokens = sum(map(len, ids))
        who: Principal = request.scope["state"]["principal"]
        request.state.rate_headers = self._take_tokens(who, n_tokens)
        t0, queue = time.monotonic(), asyncio.Queue()
        cfg = self.cfg.embeddings
        with self._engine_errors(who, n_tokens):
            job = self.engine.embed(ids, cfg.pooling, cfg.normalize, lambda ev: self.mailbox.post(queue, ev))
        status, outcome, ev = 499, "cancelled", None
        try:
            while ev is None:
                try:
                    ev = await asyncio.wait_for(queue.get(), _POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled = True
                        return Response(status_code=499)  # the client left; nobody reads this
            if ev[0] == "error":
                status, outcome = 500, "failed"
                raise APIError(
                    500, ev[1], type_="server_error", code="engine_error", reason="engine_error", audited=True
                )
            status, outcome = 200, "ok"
        finally:
            m, dt = self.metrics, time.monotonic() - t0
            m.requests.labels("embeddings", str(status)).inc()
            m.latency.labels("embeddings").observe(dt)
            m.prompt_tokens.inc(n_tokens)
            self.audit.write(
                {
                    "request_id": request.scope["state"]["request_id"],
                    "key": who.name,
                    "route": "embeddings",
                    "status": status,
                    "outcome": outcome,
                    "prompt_tokens": n_tokens,
                    "inputs": len(ids),
                    "latency_ms": round(dt * 1000, 1),
                    "input_guard": verdict.to_dict(),
                }
            )
        headers = {**request.state.rate_headers, "x-guard-input": verdict.verdict}
        return JSONResponse(embeddings.response(ev[1], encoding_format, self.model_name, n_tokens), headers=headers)

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

    def _count_verdict(self, v: Verdict, param: str = "messages") -> None:
        if self.in_guard.mode != "off":
            self.metrics.guard.labels("input", v.verdict).inc()
        if v.verdict == "block" and TIMEOUT_RULE in v.rules:
            raise _too_complex(self.limits.prep_timeout_s)
        if v.verdict == "block":
            raise APIError(
                400,
                f"the input was refused by the prompt-injection guard (rules: {', '.join(v.rules)})",
                code="content_policy_violation",
                param=param,
                reason="guard_block",
            )

    def _admit(
        self,
        kind: str,
        request: Request,
        req,
        prompt_ids: list[list[int]],
        max_tokens: int | None,
        verdict: Verdict,
        tool_names: list[str] | None = None,
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
        request.state.rate_headers = self._take_tokens(who, charge)
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
            top_logprobs=req.n_top_logprobs(),
            tool_names=tool_names,
            one_call=getattr(req, "parallel_tool_calls", None) is False,
        )
        return job, max_tokens

    def _take_tokens(self, who: Principal, charge: int) -> dict[str, str]:
        """Charge `charge` tokens to the caller (429/400 when it cannot be); the rate-limit headers."""
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
        return d.headers

    def _submit(self, job: Job, req, max_tokens: int, grammar: Grammar | None = None) -> None:
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
                frequency_penalty=req.frequency_penalty or 0.0,
                presence_penalty=req.presence_penalty or 0.0,
                logprobs=job.top_logprobs,
                grammar=grammar,
            )
            for i in range(len(job.prompts))
        ]
        with self._engine_errors(job.who, job.charged):
            job.seqs = self.engine.submit(job.prompts, params, [callback(i) for i in range(len(job.prompts))])

    @contextmanager
    def _engine_errors(self, who: Principal, charged: int):
        """The engine refusing work: the tokens back to the caller, and a 429 or 503."""
        try:
            yield
        except Overloaded as e:
            self.limiter.refund(who, charged)
            raise APIError(
                429,
                f"The server is overloaded ({e}); retry shortly",
                type_="server_overloaded",
                code="overloaded",
                headers={"retry-after": "1"},
                reason="overloaded",
            ) from None
        except EngineDown as e:
            self.limiter.refund(who, charged)
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
                    if ev[0] == "logprobs":
                        job.logprobs[i].append(ev[1:])
                    else:
                        job.texts[i] += job.guarded(i, ev[1] if ev[0] == "delta" else "", ev[0] == "done")
            if any(f is None for f in job.finish):
                return Response(status_code=499)  # the client left; nobody reads this
            job.status = "ok"
        finally:
            self._finish(job, route, 200, prompt_text)
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        return JSONResponse(
            {
                "id": job.id,
                "object": obj,
                "created": int(time.time()),
                "model": self.model_name,
                "choices": [self._choice(job, i) for i in range(len(job.prompts))],
                "usage": job.usage(),
            },
            headers=headers,
        )

    def _choice(self, job: Job, i: int) -> dict:
        text = job.texts[i]
        lp = self._logprobs(job, i, job.logprobs[i])
        if job.kind == "completion":
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": job.finish_reason(i)}
        message: dict = {"role": "assistant", "content": text}
        if job.tool_names:
            content, job.calls[i] = tools.parse(text, job.tool_names, job.one_call)
            if job.calls[i]:
                message = {"role": "assistant", "content": content.strip() or None, "tool_calls": job.calls[i]}
        return {"index": i, "message": message, "logprobs": lp, "finish_reason": job.finish_reason(i)}

    def _logprobs(self, job: Job, i: int, entries: list, offset: int = 0) -> dict | None:
        """Choice `i`'s `logprobs` for `entries` (None when not asked for, or when the guard redacted the choice)."""
        if job.top_logprobs is None or job.redacted[i]:
            return None
        if job.kind == "chat":
            return logprobs.chat(entries, self.token_texts)
        return logprobs.completion(entries, self.token_texts, offset)

    async def _stream(self, job: Job, request: Request, route: str, prompt_text: str, include_usage: bool):
        """The server-sent events of a streamed job, ending with `data: [DONE]`."""
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        # Logprobs go out with their tokens' text unless the output guard may still redact that text.
        live = job.top_logprobs is not None and not self.out_guard.on
        offsets = [0] * len(job.prompts)  # characters of each completion choice covered by its logprobs so far

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

        def chunk(i: int, text: str | None, reason: str | None, role: bool = False, lp=None, calls=None) -> str:
            lp = self._logprobs(job, i, lp, offsets[i]) if lp else None
            if lp is not None and job.kind == "completion":
                offsets[i] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            if job.kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                if calls:
                    delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                return event([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}])
            return event([{"index": i, "text": text or "", "logprobs": lp, "finish_reason": reason}])

        try:
            if job.kind == "chat":
                for i in range(len(job.prompts)):
                    yield chunk(i, None, None, role=True)
            async for batch in self._events(job, request):
                out: list[str] = []
                texts: dict[int, str] = {}  # consecutive deltas of a choice become one chunk
                lps: dict[int, list] = {}
                for i, ev in batch:
                    if ev[0] == "logprobs":
                        job.logprobs[i].append(ev[1:])
                        if live:
                            lps.setdefault(i, []).append(ev[1:])
                        continue
                    text = job.guarded(i, ev[1] if ev[0] == "delta" else "", ev[0] == "done")
                    job.texts[i] += text
                    if job.tool_streams:
                        text = job.tool_streams[i].feed(text)
                    texts[i] = texts.get(i, "") + text
                    if ev[0] == "done":
                        tail = texts.pop(i)
                        if job.tool_streams:
                            rest, job.calls[i] = job.tool_streams[i].finish()
                            tail += rest
                        lp = lps.pop(i, None) if live else job.logprobs[i]
                        if tail or lp:
                            out.append(chunk(i, tail, None, lp=lp))
                        if job.calls[i]:
                            out.append(chunk(i, None, None, calls=job.calls[i]))
                        out.append(chunk(i, None, job.finish_reason(i)))
                out += [
                    chunk(i, texts.get(i, ""), None, lp=lps.get(i))
                    for i in sorted({*texts, *lps})
                    if texts.get(i) or lps.get(i)
                ]
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
