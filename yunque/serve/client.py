"""`chat_remote`: an interactive, streaming chat against a running `yunque serve` (or any
OpenAI-compatible server); `yunque chat --url` calls it. Standard library only (urllib and a
server-sent-events reader), so it works on the default install."""

from __future__ import annotations

import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TextIO

from yunque.chat_input import HELP, MessageReader
from yunque.errors import YunqueError

_TIMEOUT_S = 600


def chat_remote(
    url: str,
    api_key: str | None = None,
    system: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Interactive chat with a running yunque (or any OpenAI-compatible) server, streaming replies.

    `url` is the server's base, e.g. http://127.0.0.1:8000 (with or without /v1). The key comes
    from `api_key` or $YUNQUE_API_KEY. Commands: /reset clears the conversation, /exit quits.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    key = api_key or os.environ.get("YUNQUE_API_KEY")
    if not key:
        raise YunqueError("--api-key (or $YUNQUE_API_KEY) is required to talk to a server")
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    api = _Client(base, key)
    try:
        model = api.get("/models")["data"][0]["id"]
    except _StatusError as e:
        raise YunqueError(f"{base}: {e.status} {e.message}") from None
    except (KeyError, IndexError, TypeError):
        raise YunqueError(f"{base}/models: no model listed") from None
    history = [{"role": "system", "content": system}] if system else []
    print(
        f"yunque chat with {model} at {base}: /exit or Ctrl-D to quit, /reset to forget the conversation.\n{HELP}",
        file=sys.stderr,
    )
    reader = MessageReader(stdin, stdout, "> " if stdin.isatty() else "")
    while True:
        text = reader.read()
        if text is None or text == "/exit":
            return 0
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        body = {
            "model": model,
            "messages": history,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            **({"seed": seed} if seed is not None else {}),
        }
        reply = []
        try:
            for delta in api.stream_chat(body):
                reply.append(delta)
                stdout.write(delta)
                stdout.flush()
        except _StatusError as e:
            history.pop()
            stdout.write(("\n" if reply else "") + f"[error {e.status}: {e.message}]\n")
            continue
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


class _StatusError(Exception):
    def __init__(self, status: int | str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Client:
    """The two calls the chat needs, over urllib."""

    def __init__(self, base: str, key: str):
        self.base, self.key = base, key

    def _open(self, path: str, body: dict | None = None):
        headers = {"Authorization": f"Bearer {self.key}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers.update({"Content-Type": "application/json", "Accept": "text/event-stream"})
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method="POST" if data else "GET")
        try:
            return urllib.request.urlopen(req, timeout=_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            raise _StatusError(e.code, _message(e.read(), e.reason)) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            why = getattr(e, "reason", e)
            raise YunqueError(f"cannot reach {self.base}: is `yunque serve` running? ({why})") from None

    def get(self, path: str) -> dict:
        with self._open(path) as r:
            try:
                return json.loads(r.read())
            except ValueError:
                raise YunqueError(f"{self.base}{path}: the answer is not JSON") from None

    def stream_chat(self, body: dict) -> Iterator[str]:
        """The text deltas of the first choice of a streamed chat completion."""
        with self._open("/chat/completions", body) as r:
            try:
                for data in _sse_data(r):
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:  # an error after the headers went out comes in-band
                        raise _StatusError("in stream", _message(data.encode(), "error"))
                    for c in chunk.get("choices", []):
                        if c.get("index", 0) == 0 and (c.get("delta") or {}).get("content"):
                            yield c["delta"]["content"]
            except (OSError, http.client.HTTPException, ValueError) as e:  # a dropped connection, or not SSE of JSON
                raise YunqueError(f"{self.base}/chat/completions: the stream broke off ({e})") from None


def _sse_data(lines) -> Iterator[str]:
    """The data of each server-sent event (the `data:` lines of one event, joined by newlines)."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def _message(body: bytes, fallback: str) -> str:
    try:
        err = json.loads(body)
    except ValueError:
        return str(fallback)
    err = err.get("error", err) if isinstance(err, dict) else err
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    return str(fallback)
