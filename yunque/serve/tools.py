"""Function calling: OpenAI messages to chat-template messages, and tool calls out of the
model's text.

`tools` go to the model's own chat template as its `tools` variable (Hugging Face's
convention, which the Llama 3.1+, Qwen2.5, Hermes and SmolLM2 templates follow); a template
that ignores them, or cannot write an assistant's tool call, makes the request a 400 rather
than a prompt that silently lacks the tools.

Two output formats are parsed, whichever the text holds:
- Hermes / Qwen2.5: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per
  call, with any text around them kept as the message content;
- Llama 3.1+: the whole reply is one JSON object `{"name": ..., "parameters": {...}}` (or
  `"arguments"`), or a JSON list of them (the `<|python_tag|>` before it is a special token and
  is not in the text).
A call counts only when it names one of the request's tools and its arguments are a JSON
object; anything else stays text. Streaming holds back text from the point where a call may
begin and sends the calls as `delta.tool_calls` when the choice ends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

from yunque.chat import apply_chat_template
from yunque.errors import YunqueError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_PROBE = "yunque_probe_function"


def template_messages(messages) -> list[dict]:
    """Request messages (schemas.ChatMessage) as the dicts chat templates read: tool-call
    arguments as objects (templates `tojson` them), the ids that tie results to calls."""
    out = []
    for m in messages:
        d: dict = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
                }
                for c in m.tool_calls
            ]
        out.append(d)
    return out


def call_format(tokenizer) -> str | None:
    """How the chat template writes an assistant's tool call: "hermes" (in `<tool_call>` tags),
    "llama" (bare JSON), or None when it does not render a `tools` list into the prompt and a
    call into the history (checked once per server, with a made-up function)."""
    tool = {"type": "function", "function": {"name": _PROBE, "description": "d", "parameters": {"type": "object"}}}
    user = {"role": "user", "content": "hi"}
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function",
            "function": {"name": _PROBE, "arguments": {}}}]}  # fmt: skip
    try:
        with_tools = apply_chat_template(tokenizer, [user], add_generation_prompt=True, tools=[tool])
        without = apply_chat_template(tokenizer, [user], add_generation_prompt=True)
        history = apply_chat_template(tokenizer, [user, call])
    except YunqueError:
        return None
    if with_tools == without or _PROBE not in with_tools or _PROBE not in history:
        return None
    return "hermes" if OPEN in history else "llama"


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(obj, names: set[str]) -> dict | None:
    """An OpenAI tool call from a parsed `{"name", "arguments" | "parameters"}` object, if it is one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _json(args)
    if not isinstance(args, dict):
        return None
    try:
        text = json.dumps(args, ensure_ascii=False)
    except RecursionError:  # nested past the recursion limit: not a call anyone can use
        return None
    return {"id": call_id(), "type": "function", "function": {"name": obj["name"], "arguments": text}}


def _json(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # model output: anything, "[[[[..." included
        return None


def parse(text: str, names: Iterable[str], one: bool = False) -> tuple[str, list[dict]]:
    """(the text outside tool calls, the calls). No call found: (text, []). With `one`
    (parallel_tool_calls: false) a second call is not parsed: it stays in the text."""
    names = set(names)
    if OPEN in text:
        content, calls, pos = [], [], 0
        while (start := text.find(OPEN, pos)) >= 0 and not (one and calls):
            end = text.find(CLOSE, start)
            body = text[start + len(OPEN) : end if end >= 0 else len(text)]
            c = _call(_json(body.strip()), names)
            if c is None:
                return text, []  # a malformed block: the reply is text, not half a call
            content.append(text[pos:start])
            calls.append(c)
            pos = len(text) if end < 0 else end + len(CLOSE)
        return "".join(content) + text[pos:], calls
    obj = _json(text.strip()) if text.lstrip().startswith(("{", "[")) else None
    objs = obj if isinstance(obj, list) and obj else [obj]
    calls = [_call(o, names) for o in objs]
    if obj is None or any(c is None for c in calls) or (one and len(calls) > 1):
        return text, []
    return "", calls


class ToolStream:
    """One streamed choice: `feed` returns the text that can go out now (none from where a call
    may begin); `finish` the rest of the content and the calls."""

    def __init__(self, names: Iterable[str], one: bool = False):
        self.names, self.one = set(names), one
        self.text, self.sent = "", 0
        self.json: bool | None = None  # a reply that starts with { or [ may be a Llama-style call

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.json is None and self.text.strip():
            self.json = self.text.lstrip().startswith(("{", "["))
        if self.json is not False:
            return ""
        at = self.text.find(OPEN, self.sent)
        if at < 0:  # hold a tail that could be the start of the tag
            at = len(self.text) - next((k for k in range(len(OPEN) - 1, 0, -1) if self.text.endswith(OPEN[:k])), 0)
        out = self.text[self.sent : max(self.sent, at)]
        self.sent += len(out)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = parse(self.text, self.names, self.one)
        # Text outside calls starts with what was sent already: calls begin after it.
        return content[self.sent :] if calls else self.text[self.sent :], calls
