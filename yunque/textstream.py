"""Streaming text out of corpus files for tokenizer training, never a whole file in memory.

Plain files are read as UTF-8 in ~1 MiB pieces cut at whitespace; `.jsonl` files give the
"text" field of each line. Bad input is a YunqueError naming the file (and line or byte offset).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from yunque.errors import YunqueError

_CHUNK = 1 << 20  # text is streamed to the trainer in ~1 MiB pieces, never a whole corpus at once


def _iter_plain(p: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos, carry = 0, ""
    with p.open("rb") as fh:
        while True:
            raw = fh.read(_CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous read
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise YunqueError(f"{p}: not UTF-8 text (invalid byte at offset {pos - pending + e.start})") from None
            pos += len(raw)
            if not raw:
                break
            # Cut after the last newline or space so no word is split across two pieces; a long
            # run without either (CJK text) waits for more input, up to a bound.
            cut = max(text.rfind("\n"), text.rfind(" ")) + 1
            if cut == 0 and len(text) < 4 * _CHUNK:
                carry = text
                continue
            cut = cut or len(text)
            carry = text[cut:]
            yield text[:cut]
    if text:
        yield text


def _iter_jsonl(p: Path) -> Iterator[str]:
    with p.open(encoding="utf-8") as fh:
        try:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise YunqueError(f"{p}:{n}: invalid JSON: {e.msg}") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise YunqueError(f'{p}:{n}: expected an object with a string "text" field')
                yield row["text"]
        except UnicodeDecodeError as e:
            raise YunqueError(f"{p}: not UTF-8 text ({e.reason})") from None


def corpus_files(files: Iterable[str | Path]) -> list[Path]:
    """Check every input up front, so a typo fails before minutes of training, not after."""
    paths = [Path(f) for f in files]
    if not paths:
        raise YunqueError("no training files given")
    for p in paths:
        if not p.is_file():
            raise YunqueError(f"{p}: no such file")
        try:
            p.open("rb").close()
        except OSError as e:
            raise YunqueError(f"{p}: cannot read: {e.strerror}") from None
    return paths


def iter_corpus(files: Iterable[str | Path]) -> Iterator[str]:
    """Stream the text of `files`: .jsonl files give each line's "text" field, other files their text."""
    for p in corpus_files(files):
        yield from (_iter_jsonl(p) if p.suffix == ".jsonl" else _iter_plain(p))
