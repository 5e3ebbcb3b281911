"""What the red team talks to: a local model directory or an OpenAI-compatible endpoint.

Both take a list of `Request`s and return one `Reply` each, so the probe runner does not care
which it has. The local target batches every request through `yunque.generate` (one KV cache
per batch); the HTTP target sends `/v1/chat/completions` requests from a small thread pool.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from yunque.errors import YunqueError


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
    def __init__(self, model_dir: str | Path, adapter: str | Path | None = None, max_tokens: int = 256,
                 temperature: float = 0.7, batch_size: int = 16):
        from yunque.evaluate.loading import load_for_eval

        self.name = str(model_dir) + (f" + {adapter}" if adapter else "")
        self.model, self.tok = load_for_eval(model_dir, adapter)
        self.max_tokens, self.temperature, self.batch_size = max_tokens, temperature, batch_size
        self.supports_raw = True

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
            idx = order[start:start + self.batch_size]
            # One seed per batch: rows still differ (they share one generator stream).
            s = Sampling(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=0.95 if self.temperature > 0 else 1.0,
                         seed=requests[idx[0]].seed + start, stop_ids=tuple(stops))
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


class OpenAITarget:
    """Any server speaking OpenAI's chat completions API (yunque serve, vLLM, llama.cpp, OpenAI)."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.7, concurrency: int = 4, timeout: float = 120.0, retries: int = 2):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise YunqueError(f"--url {url!r}: expected an http:// or https:// URL")
        self.url = _chat_url(url)
        self.name = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self.model = model or "default"
        self.max_tokens, self.temperature = max_tokens, temperature
        self.concurrency, self.retries = concurrency, retries
        self.supports_raw = False

    def _one(self, r: Request) -> Reply:
        import httpx

        body = {"model": self.model, "messages": r.messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "seed": r.seed}
        last = ""
        for attempt in range(self.retries + 1):
            try:
                resp = self.client.post(self.url, json=body)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code in (401, 403):
                    raise YunqueError(f"{self.url}: HTTP {resp.status_code} (check --api-key)")
                if resp.status_code == 200:
                    try:
                        choice = resp.json()["choices"][0]
                        return Reply(choice["message"].get("content") or "", choice.get("finish_reason") or "stop")
                    except (ValueError, KeyError, IndexError, TypeError):
                        return Reply("", "error", f"malformed response: {resp.text[:200]}")
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code < 500 and resp.status_code != 429:
                    break  # a 4xx will not get better by retrying
            time.sleep(0.5 * 2 ** attempt)
        return Reply("", "error", last)

    def complete(self, requests: list[Request]) -> list[Reply]:
        import httpx

        try:  # fail fast, with one clear message, when nothing listens at the URL
            self.client.get(self.url.rsplit("/chat/completions", 1)[0] + "/models")
        except httpx.ConnectError as e:
            raise YunqueError(f"{self.url}: cannot connect ({e})") from None
        except httpx.HTTPError:
            pass  # servers without /v1/models are fine
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests))
