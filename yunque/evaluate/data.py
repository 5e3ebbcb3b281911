"""Evaluation examples from the files the data pipeline writes (and the raw shapes it reads).

Each JSON object is parsed by `yunque.data.records.parse`, the parser data preparation and
training use, so an example is prompted exactly as its record was trained, and becomes one
`Example` by its kind:

    text            {"text"}                                   -> perplexity only
    classification  {"text" | "prompt", "label"}               -> classification (+ perplexity of the label)
    completion      {"prompt" | "question" | "input", "references" | "reference" | "completion" | "answer"
                     | "output" | "target"}
    chat            {"messages": [..., {"role": "assistant", "content": reference}]}
                    the conversation up to the last assistant turn is the prompt (chat template)
    alpaca          {"instruction", "input"?, "output", "system"?} -> a one-turn chat

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

from yunque.data.records import RecordError, parse, prompt_and_answer
from yunque.errors import DataError


@dataclass
class Example:
    source: str  # "path:line"
    kind: str  # "text" | "classification" | "generation"
    prompt: str | None = None  # raw prompt text (None for chat examples and plain text)
    messages: list[dict] | None = None  # chat prompt: rendered with the model's chat template
    references: list[str] = field(default_factory=list)
    label: str | None = None
    text: str | None = None
    tools: list[dict] | None = None  # a chat record's tool list: the template writes it into the prompt


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


def to_example(obj: Any, where: str) -> Example:
    try:
        rec = parse(obj)
    except RecordError as e:
        raise DataError(f"{where}: {e}") from None
    kind = rec["kind"]
    if kind == "chat":
        msgs = rec["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if last == 0:
            raise DataError(f"{where}: the assistant message has no prompt before it")
        return Example(
            where, "generation", messages=msgs[:last], references=[msgs[last]["content"]], tools=rec.get("tools")
        )
    if kind == "text":
        return Example(where, "text", text=rec["text"])
    prompt, answer = prompt_and_answer(rec)
    if kind == "classification":  # the runner puts the label after the prompt as `prompt_and_answer` does
        return Example(where, "classification", prompt=prompt, label=str(rec["label"]))
    return Example(where, "generation", prompt=prompt, references=rec.get("references", [answer]))


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
        raise DataError(
            f"{p}: mixes example kinds ({', '.join(f'{k} at {s}' for k, s in first.items())}); use one file per kind"
        )
    return examples
