"""Shapes and the normalised record every later stage reads.

Input shapes and what they become (one JSON object per line in train/val/test.jsonl):

    chat            {"kind": "chat", "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    alpaca          {"kind": "chat", ...}  instruction (+ "\\n\\n" + input) -> user, output -> assistant,
                    an optional `system` field -> a leading system message
    completion      {"kind": "completion", "prompt": str, "completion": str}
    text            {"kind": "text", "text": str}
    classification  {"kind": "classification", "text": str, "label": str | int}

Every record also carries `"source": "path:line"` (`path:line#k` for the k-th element of an
exploded list) and, for oversampled copies in the training split, `"oversampled": true`.

Chat input may be OpenAI style (`messages` with `role`/`content`, content a string or a list of
text parts) or ShareGPT (`conversations` with `from`/`value`, roles human/gpt/system).
A field mapping renames fields (`{"instruction": "question.title"}`, dotted paths reach into
nested objects) and `explode` turns one record holding a list (Alpaca's seed tasks with their
`instances`) into one record per element, each element's keys laid over its parent's.
"""

from __future__ import annotations

import json
from typing import Any

from yunque.data.read import RawItem

SHAPES = ("alpaca", "chat", "completion", "text", "classification")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
          "model": "assistant", "system": "system"}


class RecordError(Exception):
    """A record that cannot be used; `reason` is the counted category, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def get_path(obj: Any, path: str) -> Any:
    """`obj["a"]["b"]` for "a.b"; a missing step raises KeyError naming the path."""
    cur = obj
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(path)
    return cur


def detect_shape(samples: list[Any], fields: dict[str, str]) -> str | None:
    """The shape most of `samples` fit, looking at the (mapped) field names; None when unclear."""
    votes: dict[str, int] = {}
    for s in samples:
        shape = _shape_of(s, fields)
        if shape:
            votes[shape] = votes.get(shape, 0) + 1
    return max(sorted(votes), key=lambda k: votes[k]) if votes else None


def _shape_of(obj: Any, fields: dict[str, str]) -> str | None:
    if isinstance(obj, str):
        return "text"
    if not isinstance(obj, dict):
        return None

    def has(name: str) -> bool:
        try:
            get_path(obj, fields.get(name, name))
            return True
        except KeyError:
            return False

    if has("messages") or has("conversations"):
        return "chat"
    if has("instruction") and (has("output") or "instances" in obj):
        return "alpaca"
    if has("prompt") and has("completion"):
        return "completion"
    if has("text") and has("label"):
        return "classification"
    if has("text"):
        return "text"
    return None


def _field(obj: dict, name: str, fields: dict[str, str], *, required: bool = True, allow_int: bool = False) -> Any:
    path = fields.get(name, name)
    try:
        value = get_path(obj, path)
    except KeyError:
        if not required:
            return None
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise RecordError("missing_field", f"missing field {path!r} (has: {keys})") from None
    if value is None and not required:
        return None
    if isinstance(value, str) or (allow_int and isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise RecordError("wrong_type", f"field {path!r} must be a string, got {type(value).__name__}")


def _content(msg: dict, i: int) -> str:
    content = msg.get("content", msg.get("value"))
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts; only text is usable here
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RecordError("wrong_type", f"message {i}: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        raise RecordError("missing_field", f"message {i} has no 'content'/'value'")
    raise RecordError("wrong_type", f"message {i}: content must be a string, got {type(content).__name__}")


def _chat(obj: dict, fields: dict[str, str]) -> dict:
    msgs = None
    for name in ("messages", "conversations"):
        try:
            msgs = get_path(obj, fields.get(name, name))
            break
        except KeyError:
            continue
    if msgs is None:
        raise RecordError("missing_field", f"missing field 'messages' or 'conversations' (has: {', '.join(sorted(map(str, obj)))})")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("wrong_type", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError("wrong_type", f"message {i} must be an object, got {type(m).__name__}")
        raw_role = m.get("role", m.get("from"))
        role = _ROLES.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError("bad_role", f"message {i}: unknown role {raw_role!r} (known: {', '.join(sorted(_ROLES))})")
        if role == "system" and i != 0:
            raise RecordError("bad_role", f"message {i}: a system message may only come first")
        out.append({"role": role, "content": _content(m, i)})
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("no_assistant_turn", "conversation has no assistant turn to learn from")
    return {"kind": "chat", "messages": out}


def _alpaca(obj: dict, fields: dict[str, str]) -> dict:
    instruction = _field(obj, "instruction", fields)
    inp = _field(obj, "input", fields, required=False) or ""
    output = _field(obj, "output", fields)
    system = _field(obj, "system", fields, required=False)
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    msgs = ([{"role": "system", "content": system}] if system and system.strip() else [])
    return {"kind": "chat", "messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def _build(obj: Any, shape: str, fields: dict[str, str]) -> dict:
    if shape == "text" and isinstance(obj, str):
        return {"kind": "text", "text": obj}
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    if shape == "chat":
        return _chat(obj, fields)
    if shape == "alpaca":
        return _alpaca(obj, fields)
    if shape == "completion":
        return {"kind": "completion", "prompt": _field(obj, "prompt", fields), "completion": _field(obj, "completion", fields)}
    if shape == "classification":
        return {"kind": "classification", "text": _field(obj, "text", fields), "label": _field(obj, "label", fields, allow_int=True)}
    return {"kind": "text", "text": _field(obj, "text", fields)}


def to_records(item: RawItem, shape: str, fields: dict[str, str], explode: str | None) -> list[tuple[str, dict | RecordError]]:
    """Raw item -> normalised records (several when `explode` is set), each or its error, with its source."""
    if item.kind == "error":
        return [(item.source, RecordError(*item.payload))]
    obj = item.payload
    if item.kind == "line":
        try:
            obj = json.loads(item.payload.decode("utf-8"))
        except UnicodeDecodeError as e:
            return [(item.source, RecordError("invalid_utf8", f"invalid UTF-8 at byte {e.start}"))]
        except ValueError as e:
            return [(item.source, RecordError("invalid_json", f"malformed JSON: {e}"))]
    units: list[tuple[str, Any]] = [(item.source, obj)]
    if explode and item.kind != "text":
        if not isinstance(obj, dict):
            return [(item.source, RecordError("not_an_object", f"expected a JSON object, got {type(obj).__name__}"))]
        try:
            elems = get_path(obj, explode)
        except KeyError:
            return [(item.source, RecordError("missing_field", f"missing list field {explode!r} to explode"))]
        if not isinstance(elems, list) or not elems:
            return [(item.source, RecordError("wrong_type", f"field {explode!r} must be a non-empty list"))]
        parent = {k: v for k, v in obj.items() if k != explode.split(".")[0]}
        units = [(f"{item.source}#{k}", {**parent, **e} if isinstance(e, dict) else e) for k, e in enumerate(elems)]
    out: list[tuple[str, dict | RecordError]] = []
    for source, unit in units:
        try:
            rec = _build(unit, shape, fields)
            if _has_surrogate(rec):
                raise RecordError("invalid_utf8", "invalid UTF-8 (undecodable bytes or a lone surrogate)")
            out.append((source, rec))
        except RecordError as e:
            out.append((source, e))
    return out


def _has_surrogate(rec: dict) -> bool:
    for s in text_fields(rec):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def text_fields(rec: dict) -> list[str]:
    """The free-text strings of a record, in a fixed order (cleaning and scrubbing touch only these)."""
    kind = rec["kind"]
    if kind == "chat":
        return [m["content"] for m in rec["messages"]]
    if kind == "completion":
        return [rec["prompt"], rec["completion"]]
    return [rec["text"]]


def set_text_fields(rec: dict, values: list[str]) -> dict:
    kind = rec["kind"]
    if kind == "chat":
        return {**rec, "messages": [{**m, "content": v} for m, v in zip(rec["messages"], values)]}
    if kind == "completion":
        return {**rec, "prompt": values[0], "completion": values[1]}
    return {**rec, "text": values[0]}


def content_text(rec: dict) -> str:
    """The text that identifies a record for deduplication, length limits and split hashing.
    Chat roles are part of it (the same words from user and from assistant differ);
    a classification label is not (one text with two labels is a conflict, kept once)."""
    if rec["kind"] == "chat":
        return "\n".join(f"<{m['role']}>\n{m['content']}" for m in rec["messages"])
    if rec["kind"] == "completion":
        return f"{rec['prompt']}\n{rec['completion']}"
    return rec["text"]


def canonical_json(rec: dict) -> str:
    """The one serialisation written to split files and hashed by the manifest."""
    return json.dumps(rec, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
