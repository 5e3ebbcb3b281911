"""`chat_remote`: an interactive, streaming chat against a running `yunque serve` (or any
OpenAI-compatible server) through the official `openai` client; `yunque chat --url` calls it."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from yunque.errors import YunqueError, require


def chat_remote(url: str, api_key: str | None = None, system: str | None = None, max_tokens: int = 256,
                temperature: float = 0.7, top_p: float = 1.0, seed: int | None = None,
                stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Interactive chat with a running yunque (or any OpenAI-compatible) server, streaming replies.

    `url` is the server's base, e.g. http://127.0.0.1:8000 (with or without /v1). The key comes
    from `api_key` or $YUNQUE_API_KEY. Commands: /reset clears the conversation, /exit quits.
    """
    openai = require("openai", "serve", "yunque chat --url")
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    key = api_key or os.environ.get("YUNQUE_API_KEY")
    if not key:
        raise YunqueError("--api-key (or $YUNQUE_API_KEY) is required to talk to a server")
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=600)
    try:
        model = client.models.list().data[0].id
    except openai.APIConnectionError:
        raise YunqueError(f"cannot reach {base}: is `yunque serve` running?") from None
    except openai.APIStatusError as e:
        raise YunqueError(f"{base}: {e.status_code} {_message(e)}") from None
    history = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        reply = []
        try:
            stream = client.chat.completions.create(model=model, messages=history, stream=True,
                                                    max_tokens=max_tokens, temperature=temperature,
                                                    top_p=top_p, seed=seed)
            for chunk in stream:
                for c in chunk.choices:
                    if c.delta.content:
                        reply.append(c.delta.content)
                        stdout.write(c.delta.content)
                        stdout.flush()
        except openai.APIStatusError as e:
            history.pop()
            stdout.write(f"[error {e.status_code}: {_message(e)}]\n")
            continue
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(e)
