"""What the red team talks to: a local model directory or an OpenAI-compatible endpoint.

Both take a list of `Request`s and return one `Reply` each, so the probe runner does not care
which it has. The local target batches every request through `yunque.generate` (one KV cache
per batch); the HTTP target sends `/v1/chat/completions` requests from a small thread pool.
"""

from __future__ import annotations

import email.utils
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from yunque.errors import YunqueError
from yunque.threads import ThreadPolicy


@dataclass
class Request:
    messages: list[dict] = field(default_factory=list)  # chat request
    raw: str | None = None  # or a raw completion prompt (canary prefixes on a local model)
    seed: int = 0


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None


class LocalTarget:
    def __init__(
        self,
        model_dir: str | Path,
        adapter: str | Path | None = None,
        max_tokens: int = 256,
        temperature: float = 0.7,
        batch_size: int = 16,
    ):
        from yunque.evaluate.loading import load_for_eval

        self.name = str(model_dir) + (f" + {adapter}" if adapter else "")
        self.model, self.tok = load_for_eval(model_dir, adapter)
        self.max_tokens, self.temperature, self.batch_size = max_tokens, temperature, batch_size
        self.supports_raw = True
        # On the CPU, torch runs on the cores other processes leave free, re-checked per batch.
        self.threads = ThreadPolicy() if next(self.model.parameters()).device.type == "cpu" else None

    def _ids(self, r: Request) -> list[int]:
        from yunque.chat import apply_chat_template

        tok = self.tok
        bos = [tok.bos_id] if tok.bos_id is not None else []
        if r.raw is not None:
            return bos + tok.encode(r.raw)
        if tok.chat_template is not None:
            return tok.encode(apply_chat_template(tok, r.messages, add_generation_prompt=True))
        # A base model without a chat template still gets the text of every turn, in order.
        return bos + tok.encode("\n\n".join(m["content"] for m in r.messages) + "\n\n")

    def complete(self, requests: list[Request]) -> list[Reply]:
        from yunque.generate import Sampling, generate

        tok = self.tok
        stops = set(tok.stop_ids)
        pad = tok.pad_id if tok.pad_id is not None else 0
        ids = [self._ids(r) for r in requests]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[Reply | None] = [None] * len(ids)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.threads is not None:
                self.threads.update()
            # One seed per batch: rows still differ (they share one generator stream).
            s = Sampling(
                max_new_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=0.95 if self.temperature > 0 else 1.0,
                seed=requests[idx[0]].seed + start,
                stop_ids=tuple(stops),
            )
            for i, new in zip(idx, generate(self.model, [ids[i] for i in idx], s, pad)):
                stopped = bool(new) and new[-1] in stops
                text = tok.decode([t for t in new if t not in stops], skip_special_tokens=True)
                out[i] = Reply(text, "stop" if stopped else "length")
        return out  # type: ignore[return-value]


def _chat_url(url: str) -> str:
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    return u + ("/chat/completions" if u.endswith("/v1") else "/v1/chat/completions")


def retry_after(resp) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms` (OpenAI), else `Retry-After` as
    seconds or an HTTP date (RFC 9110); None without a usable header."""
    h = resp.headers
    try:
        if "retry-after-ms" in h:
            s = float(h["retry-after-ms"]) / 1000
        elif "retry-after" in h:
            v = h["retry-after"].strip()
            try:
                s = float(v)
            except ValueError:
                when = email.utils.parsedate_to_datetime(v)
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                s = (when - datetime.now(UTC)).total_seconds()
        else:
            return None
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, s) if math.isfinite(s) else None


def _detail(resp) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        msg = resp.json()["error"]["message"]
        if isinstance(msg, str):
            return msg[:200]
    except (ValueError, KeyError, TypeError):
        pass
    return resp.text[:200]


class OpenAITarget:
    """Any server speaking OpenAI's chat completions API (yunque serve, vLLM, llama.cpp, OpenAI).

    The model asked for is `model`, else the one the server lists at /v1/models. A 429 is waited
    out: its Retry-After, else exponential backoff from 1 s, for at most `max_wait` seconds in all
    per request. The threads share one rate limit and race for each freed slot, so a request may
    lose several races in a row: the retry count only stops a server that says "Retry-After: 0"
    forever, the wait budget is the real bound. Connection errors and 5xx are retried `retries`
    times. A request that still fails comes back as a Reply with `error` set, which the runner
    counts as failed, never as an answer.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.7,
        concurrency: int = 4,
        timeout: float = 120.0,
        retries: int = 2,
        max_wait: float = 300.0,
        rate_limit_retries: int = 50,
        transport=None,
    ):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise YunqueError(f"--url {url!r}: expected an http:// or https:// URL")
        self.url = _chat_url(url)
        self.models_url = self.url.rsplit("/chat/completions", 1)[0] + "/models"
        self.base_url = self.name = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout, transport=transport)
        self.model = model
        self.max_tokens, self.temperature = max_tokens, temperature
        self.concurrency, self.retries = concurrency, retries
        self.max_wait, self.rate_limit_retries = max_wait, rate_limit_retries
        self.supports_raw = False
        self.sleep = time.sleep  # tests count the waits instead of sleeping them

    def _request(self, method: str, url: str, body: dict | None = None):
        """(last response, why it was given up on or ""); raises httpx.HTTPError when every try failed in transport."""
        import httpx

        waited, failures, limited = 0.0, 0, 0
        while True:
            try:
                resp = self.client.request(method, url, json=body)
            except httpx.HTTPError:
                if failures >= self.retries:
                    raise
                delay, failures = 0.5 * 2**failures, failures + 1
            else:
                if resp.status_code == 429:
                    asked = retry_after(resp)
                    delay = asked if asked is not None else min(60.0, 2.0**limited)
                    if limited >= self.rate_limit_retries:
                        return resp, f" (still rate limited after {limited} retries, {waited:.0f} s of waiting)"
                    if waited + delay > self.max_wait:
                        return resp, (
                            f" (rate limited; waiting {delay:.0f} s more would pass the wait budget of "
                            f"{self.max_wait:.0f} s per request, --max-wait)"
                        )
                    limited += 1
                elif resp.status_code >= 500 and failures < self.retries:
                    asked = retry_after(resp)
                    delay = min(asked, 60.0) if asked is not None else 0.5 * 2**failures
                    failures += 1
                else:
                    return resp, ""
            self.sleep(delay)
            waited += delay

    def resolve_model(self) -> str:
        """The model to ask for: the one given, checked against /v1/models where the server lists
        models, else the only one the server lists."""
        import httpx

        try:
            resp, _ = self._request("GET", self.models_url)
        except httpx.ConnectError as e:
            raise YunqueError(f"{self.url}: cannot connect ({e})") from None
        except httpx.HTTPError as e:
            resp, why = None, f"{type(e).__name__}: {e}"
        else:
            why = f"HTTP {resp.status_code}: {_detail(resp)}"
        if resp is not None and resp.status_code in (401, 403):
            raise YunqueError(f"{self.models_url}: HTTP {resp.status_code} (check --api-key)")
        served = None
        if resp is not None and resp.status_code == 200:
            try:
                served = [str(m["id"]) for m in resp.json()["data"]]
            except (ValueError, KeyError, TypeError):
                why = f"not a model list: {resp.text[:200]}"
        if self.model is not None:
            if served and self.model not in served:
                raise YunqueError(
                    f"--model {self.model!r}: {self.models_url} does not serve it (it serves: {', '.join(served[:10])})"
                )
            return self.model
        if not served:
            raise YunqueError(
                f"{self.models_url}: cannot list the served models ({why}); name the model with --model NAME"
            )
        if len(served) > 1:
            raise YunqueError(
                f"{self.models_url} serves {len(served)} models ({', '.join(served[:10])}): "
                "choose one with --model NAME"
            )
        return served[0]

    def _one(self, r: Request) -> Reply:
        import httpx

        body = {
            "model": self.model,
            "messages": r.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": r.seed,
        }
        try:
            resp, why = self._request("POST", self.url, body)
        except httpx.HTTPError as e:
            return Reply("", "error", f"{type(e).__name__}: {e}")
        if resp.status_code in (401, 403):
            raise YunqueError(f"{self.url}: HTTP {resp.status_code} (check --api-key)")
        if resp.status_code != 200:
            return Reply("", "error", f"HTTP {resp.status_code}: {_detail(resp)}{why}")
        try:
            choice = resp.json()["choices"][0]
            return Reply(choice["message"].get("content") or "", choice.get("finish_reason") or "stop")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Reply("", "error", f"malformed response: {resp.text[:200]}")

    def complete(self, requests: list[Request]) -> list[Reply]:
        self.model = self.resolve_model()
        self.name = f"{self.base_url} (model {self.model})"
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests))
