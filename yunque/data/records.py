"""Record shapes: the one place a raw object becomes a normalised record, and what a record is
prompted with and must produce. Data preparation, training and evaluation all read records
through `parse`, so one record gives one prompt everywhere.

Input shapes and what they become (one JSON object per line in train/val/test.jsonl):

    chat            {"kind": "chat", "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
                    "tools": [...]?}; an assistant message may carry `tool_calls` (its content may then be
                    empty) and `"weight": 0` (OpenAI's fine-tuning format: context, not trained),
                    a tool message `tool_call_id` and `name`
    alpaca          {"kind": "chat", ...}  instruction (+ "\\n\\n" + input, unless input is blank) -> user,
                    output -> assistant, an optional non-blank `system` field -> a leading system message
    completion      {"kind": "completion", "prompt": str, "completion": str}; the prompt may come from
                    `prompt`, `question` or `input`, the answer from `references` (a list: several
                    acceptable answers, kept as "references", the first is the completion), `reference`,
                    `completion`, `answer`, `output` or `target`
    text            {"kind": "text", "text": str}
    classification  {"kind": "classification", "text": str, "label": str | int} (text from `text` or `prompt`)

A chat, alpaca or completion record with a `label` field keeps it as "label" (for stratified splits
and oversampling; training and evaluation ignore it). Every record from `data prepare` also carries
`"source": "path:line"` (`path:line#k` for the k-th element of an exploded list) and, for
oversampled copies in the training split, `"oversampled": true`.

Chat input may be OpenAI style (`messages` with `role`/`content`, content a string or a list of
text parts) or ShareGPT (`conversations` with `from`/`value`, roles human/gpt/system).
Tool use is kept as Hugging Face chat templates read it: a record's `tools` list (function
schemas, OpenAI style), assistant `tool_calls` (`{"type": "function", "function": {"name",
"arguments"}}`, arguments a JSON object or a string holding one, kept as the object) and `tool`
messages with the results. Training renders them through the chat template and learns the calls,
not the results. Preference data (`chosen`/`rejected`) is a shape of its own that nothing here
trains on: such records are counted as `unsupported_shape`, never read as something else.
A field mapping renames fields (`{"instruction": "question.title"}`, dotted paths reach into
nested objects) and `explode` turns one record holding a list (Alpaca's seed tasks with their
`instances`) into one record per element, each element's keys laid over its parent's.
Normalised records are themselves valid input: parsing one gives it back.
"""

from __future__ import annotations

import json
from typing import Any

from yunque.data.read import RawItem

PROMPT_FIELDS = ("prompt", "question", "input")  # where a completion's prompt may be, in this order
ANSWER_FIELDS = ("references", "reference", "completion", "answer", "output", "target")
TEXT_FIELDS = ("text", "prompt")  # a classification record's text
_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
}


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
        shape = shape_of(s, fields)
        if shape:
            votes[shape] = votes.get(shape, 0) + 1
    return max(sorted(votes), key=lambda k: votes[k]) if votes else None


def shape_of(obj: Any, fields: dict[str, str] | None = None) -> str | None:
    """The shape of one raw object by its (mapped) field names; None when it fits none."""
    fields = fields or {}
    if isinstance(obj, str):
        return "text"
    if not isinstance(obj, dict):
        return None

    def has(name: str, aliases: tuple[str, ...] = ()) -> bool:
        return _path_of(obj, name, fields, aliases) is not None

    if has("chosen") and has("rejected"):
        return "preference"  # checked first: such records often carry `prompt` or `messages` too
    if has("messages") or has("conversations"):
        return "chat"
    if has("instruction"):
        return "alpaca"
    if has("prompt", PROMPT_FIELDS) and has("completion", ANSWER_FIELDS):
        return "completion"
    if has("label") and has("text", TEXT_FIELDS):
        return "classification"
    if has("text"):
        return "text"
    if has("prompt", PROMPT_FIELDS):
        return "completion"  # without an answer: parsing says which field is missing
    return None


def parse(obj: Any, shape: str | None = None, fields: dict[str, str] | None = None) -> dict:
    """One raw object -> its normalised record (`shape` None: detected from the object's fields).
    Raises RecordError with the counted reason and a message naming the field."""
    fields = fields or {}
    if shape is None:
        shape = shape_of(obj, fields)
        if shape is None:
            keys = ", ".join(sorted(map(str, obj))) if isinstance(obj, dict) else type(obj).__name__
            raise RecordError(
                "unknown_shape",
                f"no known shape (fields: {keys or 'none'}); expected text, "
                "prompt+reference, messages, instruction+output or text+label",
            )
    return _build(obj, shape, fields)


def _path_of(obj: dict, name: str, fields: dict[str, str], aliases: tuple[str, ...] = ()) -> str | None:
    """The path of canonical field `name` in `obj`: its mapping if given, else the first of
    `aliases` (or `name`) present; None when absent."""
    for path in [fields[name]] if name in fields else (aliases or (name,)):
        try:
            get_path(obj, path)
            return path
        except KeyError:
            continue
    return None


def _has_keys(obj: dict) -> str:
    # Keys come from the input: undecodable bytes (kept as lone surrogates) are shown escaped.
    return ", ".join(sorted(str(k).encode("utf-8", "backslashreplace").decode("utf-8") for k in obj)) or "none"


def _missing(obj: dict, name: str, fields: dict[str, str], aliases: tuple[str, ...], what: str) -> RecordError:
    if name in fields or not aliases:
        return RecordError("missing_field", f"missing {what} {fields.get(name, name)!r} (has: {_has_keys(obj)})")
    return RecordError(
        "missing_field", f"missing {what} (expected one of: {', '.join(aliases)}; has: {_has_keys(obj)})"
    )


def _field(
    obj: dict,
    name: str,
    fields: dict[str, str],
    *,
    required: bool = True,
    allow_int: bool = False,
    aliases: tuple[str, ...] = (),
    what: str = "field",
) -> Any:
    path = _path_of(obj, name, fields, aliases)
    if path is None:
        if not required:
            return None
        raise _missing(obj, name, fields, aliases, what)
    value = get_path(obj, path)
    if value is None and not required:
        return None
    if isinstance(value, str) or (allow_int and isinstance(value, int) and not isinstance(value, bool)):
        return value
    kind = "a string or an integer" if allow_int else "a string"
    raise RecordError("wrong_type", f"field {path!r} must be {kind}, got {type(value).__name__}")


def _answers(obj: dict, fields: dict[str, str]) -> list[str]:
    """The reference answers of a completion record: one string, or a non-empty list of them."""
    path = _path_of(obj, "completion", fields, ANSWER_FIELDS)
    if path is None:
        raise _missing(obj, "completion", fields, ANSWER_FIELDS, "reference field")
    value = get_path(obj, path)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise RecordError("wrong_type", f"field {path!r} must be a string or a non-empty list of strings")


def _with_label(rec: dict, obj: dict, fields: dict[str, str]) -> dict:
    """`rec` with the object's label, if it has one. Beside messages or a completion a `label` field is
    metadata: one that is not a string or an integer (a list of tags) is left out, unless a field
    mapping asked for it."""
    if "label" in fields:
        label = _field(obj, "label", fields, required=False, allow_int=True)
    else:
        label = obj.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            label = None
    return rec if label is None else {**rec, "label": label}


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


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """An assistant message's tool calls as chat templates read them (arguments as an object)."""
    if not isinstance(calls, list) or not calls:
        raise RecordError("wrong_type", f"message {i}: tool_calls must be a non-empty list")
    out = []
    for k, c in enumerate(calls):
        where = f"message {i}: tool_calls[{k}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError("wrong_type", f"{where}: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as JSON text; templates `tojson` an object
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                raise RecordError("wrong_type", f"{where}: arguments are not valid JSON") from None
        if not isinstance(args, dict):
            raise RecordError("wrong_type", f"{where}: arguments must be a JSON object")
        _check_depth(args, f"{where}: arguments")
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def _tools(obj: dict, fields: dict[str, str]) -> list[dict] | None:
    try:
        tools = get_path(obj, fields.get("tools", "tools"))
    except KeyError:
        return None
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("wrong_type", "tools must be a list of function schemas (objects)")
    _check_depth(tools, "tools")
    return tools


_MAX_DEPTH = 64  # JSON schemas and arguments are shallow; deeper nesting would exhaust recursion later


def _check_depth(value: Any, what: str) -> None:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > _MAX_DEPTH:
            raise RecordError("wrong_type", f"{what}: nested more than {_MAX_DEPTH} levels deep")
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def _chat(obj: dict, fields: dict[str, str]) -> dict:
    msgs = None
    for name in ("messages", "conversations"):
        try:
            msgs = get_path(obj, fields.get(name, name))
            break
        except KeyError:
            continue
    if msgs is None:
        raise RecordError("missing_field", f"missing field 'messages' or 'conversations' (has: {_has_keys(obj)})")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("wrong_type", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError("wrong_type", f"message {i} must be an object, got {type(m).__name__}")
        raw_role = m.get("role", m.get("from"))
        role = _ROLES.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError(
                "bad_role", f"message {i}: unknown role {raw_role!r} (known: {', '.join(sorted(_ROLES))})"
            )
        if role == "system" and i != 0:
            raise RecordError("bad_role", f"message {i}: a system message may only come first")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls:  # OpenAI exports write `"tool_calls": null` (or []) on plain replies
            msg = {"role": role, "content": "" if m.get("content", m.get("value")) is None else _content(m, i)}
            msg["tool_calls"] = _tool_calls(calls, i)
        else:
            msg = {"role": role, "content": _content(m, i)}
        if role == "tool":
            msg.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        if role == "assistant" and m.get("weight") is not None:  # OpenAI's format: 0 = context, not trained
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise RecordError("wrong_type", f"message {i}: weight must be 0 or 1, got {m['weight']!r}")
            if m["weight"] == 0:
                msg["weight"] = 0
        out.append(msg)
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError(
            "no_assistant_turn", "missing reference: no assistant message to learn from or compare against"
        )
    rec: dict = {"kind": "chat", "messages": out}
    tools = _tools(obj, fields)
    if tools is not None:
        rec["tools"] = tools
    return _with_label(rec, obj, fields)


def _alpaca(obj: dict, fields: dict[str, str]) -> dict:
    instruction = _field(obj, "instruction", fields)
    inp = _field(obj, "input", fields, required=False) or ""
    output = _field(obj, "output", fields, what="reference field")
    system = _field(obj, "system", fields, required=False)
    # A blank input or system field is an empty slot in the table, not part of the prompt.
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    msgs = [{"role": "system", "content": system}] if system and system.strip() else []
    rec = {
        "kind": "chat",
        "messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}],
    }
    return _with_label(rec, obj, fields)


def _build(obj: Any, shape: str, fields: dict[str, str]) -> dict:
    if shape == "text" and isinstance(obj, str):
        return {"kind": "text", "text": obj}
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    if shape == "preference" or shape_of(obj, fields) == "preference":  # in a file of another shape too
        raise RecordError(
            "unsupported_shape",
            "preference data (chosen/rejected pairs) is not supported: yunque trains on one answer per "
            "prompt; keep the chosen answers as chat or completion records to fine-tune on them",
        )
    if shape == "chat":
        return _chat(obj, fields)
    if shape == "alpaca":
        return _alpaca(obj, fields)
    if shape == "completion":
        prompt = _field(obj, "prompt", fields, aliases=PROMPT_FIELDS)
        answers = _answers(obj, fields)
        rec = {"kind": "completion", "prompt": prompt, "completion": answers[0]}
        return _with_label({**rec, "references": answers} if len(answers) > 1 else rec, obj, fields)
    if shape == "classification":
        return {
            "kind": "classification",
            "text": _field(obj, "text", fields, aliases=TEXT_FIELDS),
            "label": _field(obj, "label", fields, allow_int=True),
        }
    return {"kind": "text", "text": _field(obj, "text", fields)}


def to_records(
    item: RawItem, shape: str, fields: dict[str, str], explode: str | None
) -> list[tuple[str, dict | RecordError]]:
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
        except RecursionError:
            return [(item.source, RecordError("invalid_json", "malformed JSON: nested too deeply"))]
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
    # Every string, not only the texts: a label or a message field with undecodable bytes would
    # otherwise fail later, when the record is written.
    stack: list = [rec]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _leaves(v: Any) -> list[str]:
    """The strings inside a JSON value (tool-call arguments), in a fixed order."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        return [s for x in v.values() for s in _leaves(x)]
    if isinstance(v, list):
        return [s for x in v for s in _leaves(x)]
    return []


def _with_leaves(v: Any, it) -> Any:
    if isinstance(v, str):
        return next(it)
    if isinstance(v, dict):
        return {k: _with_leaves(x, it) for k, x in v.items()}
    if isinstance(v, list):
        return [_with_leaves(x, it) for x in v]
    return v


def _call_args(rec: dict) -> list[Any]:
    return [c["function"]["arguments"] for m in rec["messages"] for c in m.get("tool_calls", ())]


def text_fields(rec: dict) -> list[str]:
    """The free-text strings of a record, in a fixed order (cleaning and scrubbing touch only these):
    a chat's message contents, then the strings inside its tool-call arguments."""
    kind = rec["kind"]
    if kind == "chat":
        return [m["content"] for m in rec["messages"]] + [t for a in _call_args(rec) for t in _leaves(a)]
    if kind == "completion":
        return [rec["prompt"], rec["completion"], *rec.get("references", [])[1:]]
    return [rec["text"]]


def set_text_fields(rec: dict, values: list[str]) -> dict:
    kind = rec["kind"]
    if kind == "chat":
        n = len(rec["messages"])
        it = iter(values[n:])
        msgs = []
        for m, v in zip(rec["messages"], values):
            m = {**m, "content": v}
            if "tool_calls" in m:
                m["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": _with_leaves(c["function"]["arguments"], it)}}
                    for c in m["tool_calls"]
                ]
            msgs.append(m)
        return {**rec, "messages": msgs}
    if kind == "completion":
        more = {"references": [values[1], *values[2:]]} if "references" in rec else {}
        return {**rec, "prompt": values[0], "completion": values[1], **more}
    return {**rec, "text": values[0]}


def content_text(rec: dict) -> str:
    """The text that identifies a record for deduplication, length limits and split hashing.
    Chat roles are part of it (the same words from user and from assistant differ);
    a classification label is not (one text with two labels is a conflict, kept once)."""
    if rec["kind"] == "chat":
        # A tool call is part of the conversation. The `tools` list is not: many records share one
        # long list, which would make them all near duplicates of each other.
        return "\n".join(
            f"<{m['role']}>\n{m['content']}" + (f"\n{_json_text(m['tool_calls'])}" if "tool_calls" in m else "")
            for m in rec["messages"]
        )
    if rec["kind"] == "completion":
        return "\n".join([rec["prompt"], rec["completion"], *rec.get("references", [])[1:]])
    return rec["text"]


def prompt_and_answer(rec: dict) -> tuple[str, str]:
    """The raw-text prompt of a completion or classification record and what must follow it.

    Training learns the answer after the prompt; evaluation prompts with the same text and compares
    against (or scores) the same answer. A label follows its text after one space unless the text
    ends in whitespace, the convention of lm-evaluation-harness and of `yunque eval`'s likelihood
    scoring (`label_continuation`)."""
    if rec["kind"] == "completion":
        return rec["prompt"], rec["completion"]
    if rec["kind"] == "classification":
        text = rec["text"]
        return text, ("" if not text or text[-1].isspace() else " ") + str(rec["label"])
    raise ValueError(f"a {rec['kind']} record has no raw-text prompt")


def label_of(rec: dict, source: str = "label") -> str | int | None:
    """The label a record is stratified and oversampled by: its `label` field (a classification
    label, or the `label` a chat/alpaca/completion record carried), or with `source="answer"` the
    answer itself (the final assistant message or the completion; for one-word answers such as
    triage verdicts that is the class). None: the record has none."""
    if source == "answer" and rec["kind"] == "chat":
        return next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "assistant").strip()
    if source == "answer" and rec["kind"] == "completion":
        return rec["completion"].strip()
    return rec.get("label")


def _json_text(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, sort_keys=True)


def canonical_json(rec: dict) -> str:
    """The one serialisation written to split files and hashed by the manifest."""
    return json.dumps(rec, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
