"""Evaluation examples from the files the data pipeline writes (and the raw shapes it reads).

Each JSON object becomes one `Example` by its fields:

    text            {"text"}                                   -> perplexity only
    classification  {"text" | "prompt", "label"}               -> classification (+ perplexity of the label)
    completion      {"prompt", "completion" | "reference" | "references" | "answer" | "output" | "target"}
    chat            {"messages": [..., {"role": "assistant", "content": reference}]}
                    the conversation up to the last assistant turn is the prompt (chat template)
    alpaca          {"instruction", "input"?, "output"}        -> a one-turn chat

`references` may be a list (several acceptable answers). Files: .jsonl, .json (an array or
JSON Lines), optionally gzip-compressed. An empty file or a record of no known shape is a
DataError naming the file and line.
"""

from __future__ import annotations

import gzip
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
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not raw.strip():
        raise DataError(f"{path}: empty file (no examples)")
    if raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        return [(f"{path}#{i}", obj) for i, obj in enumerate(items)]
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg}") from None
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
