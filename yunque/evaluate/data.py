"""Evaluation examples from the files the data pipeline writes (and the raw shapes it reads).

Each JSON object becomes one `Example` by its fields:

    text            {"text"}                                   -> perplexity only
    classification  {"text" | "prompt", "label"}               -> classification (+ perplexity of the label)
    completion      {"prompt", "completion" | "reference" | "references" | "answer" | "output" | "target"}
    chat            {"messages": [..., {"role": "assistant", "content": reference}]}
                    the conversation up to the last assistant turn is the prompt (chat template)
    alpaca          {"instruction", "input"?, "output"}        -> a one-turn chat

`references` may be a list (several acceptable answers). Files are read by the data pipeline's
reader (`yunque.data.read`): JSONL, JSON arrays, CSV/TSV, Parquet, plain text, optionally
gzip-compressed. An empty file, an unreadable part or a record of no known shape is a DataError
naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yunque.errors import DataError

REFERENCE_KEYS = ("references", "reference", "completion", "answer", "output", "target")
PROMPT_KEYS = ("prompt", "question", "input")


@dataclass
class Example:
    source: str  # "path:line"
    kind: str  # "text" | "classification" | "generation"
    prompt: str | None = None  # raw prompt text (None for chat examples and plain text)
    messages: list[dict] | None = None  # chat prompt: rendered with the model's chat template
    references: list[str] = field(default_factory=list)
    label: str | None = None
    text: str | None = None


def _records(path: Path) -> list[tuple[str, Any]]:
    """(source, object) pairs through the data pipeline's reader; any unreadable part is an error here,
    since a metric over silently fewer examples would be a wrong number."""
    from yunque.data.read import iter_file

    if not path.exists():
        raise DataError(f"{path}: no such file")
    out = []
    for item in iter_file(path):
        if item.kind == "error":
            reason, message = item.payload
            raise DataError(f"{path}: {message}" if reason == "empty_file" else f"{item.source}: {message}")
        if item.kind == "line":
            try:
                obj = json.loads(item.payload.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{item.source}: invalid UTF-8 at byte {e.start}") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{item.source}: invalid JSON: {e.msg}") from None
        else:
            obj = {"text": item.payload} if item.kind == "text" else item.payload
        out.append((item.source, obj))
    return out


def _str(obj: dict, key: str, where: str) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def to_example(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: missing reference: no assistant message to compare against")
        if last == 0:
            raise DataError(f"{where}: the assistant message has no prompt before it")
        return Example(where, "generation", messages=msgs[:last], references=[msgs[last]["content"]])
    if "instruction" in obj:
        if "output" not in obj:
            raise DataError(f"{where}: missing reference field 'output' (alpaca record)")
        user = _str(obj, "instruction", where)
        if obj.get("input"):
            user += "\n\n" + _str(obj, "input", where)
        msgs = ([{"role": "system", "content": _str(obj, "system", where)}] if obj.get("system") else [])
        return Example(where, "generation", messages=msgs + [{"role": "user", "content": user}],
                       references=[_str(obj, "output", where)])
    if "label" in obj:
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{where}: field 'label' must be a string or an integer")
        key = "prompt" if "prompt" in obj else "text" if "text" in obj else None
        if key is None:
            raise DataError(f"{where}: classification record needs a 'text' or 'prompt' field")
        return Example(where, "classification", prompt=_str(obj, key, where), label=str(label))
    prompt_key = next((k for k in PROMPT_KEYS if k in obj), None)
    if prompt_key is not None:
        ref_key = next((k for k in REFERENCE_KEYS if k in obj), None)
        if ref_key is None:
            raise DataError(f"{where}: missing reference field (expected one of: {', '.join(REFERENCE_KEYS)})")
        refs = obj[ref_key]
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{where}: field {ref_key!r} must be a string or a non-empty list of strings")
        return Example(where, "generation", prompt=_str(obj, prompt_key, where), references=refs)
    if "text" in obj:
        return Example(where, "text", text=_str(obj, "text", where))
    raise DataError(f"{where}: no known shape (fields: {', '.join(sorted(obj)) or 'none'}); expected "
                    "text, prompt+reference, messages, instruction+output or text+label")


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """All examples of one file; mixing kinds in one file is an error (one metric set per file)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a directory; pass a file (e.g. {p / 'test.jsonl'})")
    recs = _records(p)
    if not recs:
        raise DataError(f"{p}: empty file (no examples)")
    examples = [to_example(obj, where) for where, obj in recs[:limit]]
    kinds = {e.kind for e in examples}
    if len(kinds) > 1:
        first = {k: next(e.source for e in examples if e.kind == k) for k in sorted(kinds)}
        raise DataError(f"{p}: mixes example kinds ({', '.join(f'{k} at {s}' for k, s in first.items())}); "
                        "use one file per kind")
    return examples
