"""Streaming readers: files and globs in, raw items out, one at a time.

Formats: JSON Lines, JSON arrays (parsed incrementally, never loaded whole), CSV/TSV,
Parquet (row-group batches), plain text (one document per file or per blank-line
separated block), and gzip of any of these (`x.jsonl.gz`). Every item carries its
origin as `path:line` so that any later message can point at it.

A reader never raises on bad data: an unreadable file, an empty file or a JSON array
that stops parsing half-way yields a `RawItem` of kind "error" with the reason; the
pipeline counts it and decides (`on_error`) whether to stop. Text is decoded with
`surrogateescape` so invalid UTF-8 survives as lone surrogates and is rejected per
record (with its line) by `normalize.to_records`, instead of aborting the file.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_JSON_CHUNK = 1 << 20
_BLOCK = 1 << 19  # JSONL bytes per block handed to a worker
_TEXT_EXT = {".txt", ".md", ".text"}
FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    **{e: "text" for e in _TEXT_EXT},
}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in a CSV cell are normal here


@dataclass(frozen=True)
class RawItem:
    """One unit of input before mapping. `kind` says how to read `payload`:
    "line": bytes of one JSONL line; "lines": a block of whole JSONL lines whose first line is the
    one `source` names (workers split it: far cheaper than shipping lines one by one between
    processes); "obj": an already parsed JSON/CSV/Parquet row;
    "text": one plain-text document; "error": `payload` is (reason, message)."""

    source: str
    kind: str
    payload: Any


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files, directories (recursively, supported extensions only) and globs -> sorted unique files.

    A pattern or path that matches nothing is an error rather than an empty run."""
    from yunque.errors import DataError

    out: list[Path] = []
    for spec in inputs:
        s = str(spec)
        if any(c in s for c in "*?["):
            hits = sorted(Path(p) for p in glob.glob(s, recursive=True) if Path(p).is_file())
            if not hits:
                raise DataError(f"{s}: glob matches no files")
            out.extend(hits)
        elif Path(s).is_dir():
            hits = sorted(p for p in Path(s).rglob("*") if p.is_file() and file_kind(p) is not None)
            if not hits:
                raise DataError(f"{s}: directory holds no supported data files")
            out.extend(hits)
        elif Path(s).is_file():
            out.append(Path(s))
        else:
            raise DataError(f"{s}: no such file")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def file_kind(path: Path) -> str | None:
    """ "jsonl" | "json" | "csv" | "tsv" | "parquet" | "text" from the extension (ignoring .gz)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return FILE_KINDS.get(suffixes[-1]) if suffixes else None


# What reading a damaged file raises: gzip's own errors, zlib's for a corrupt deflate stream, and
# pyarrow's for a Parquet file it cannot parse (ArrowInvalid is a ValueError, ArrowIOError an OSError).
_DAMAGED = (OSError, EOFError, gzip.BadGzipFile, zlib.error)


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _text(fh: IO[bytes]) -> io.TextIOWrapper:
    # utf-8-sig drops a BOM; surrogateescape keeps bad bytes for per-record rejection.
    return io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")


def iter_file(
    path: Path, text_unit: str = "file", tmp_dir: Path | None = None, blocks: bool = False
) -> Iterator[RawItem]:
    """All raw items of one file, in order (JSONL as "lines" blocks when `blocks`). Never raises for bad content."""
    kind = file_kind(path)
    name = str(path)
    if kind is None:
        known = ", ".join(sorted(FILE_KINDS))
        msg = f"unsupported file type {path.name!r} (known: {known}, optionally .gz)"
        yield RawItem(f"{name}:0", "error", ("unsupported_file", msg))
        return
    n = 0
    try:
        if kind == "parquet" and path.suffix.lower() == ".gz":
            gen = _iter_gz_parquet(path, tmp_dir)
        else:
            gen = {
                "jsonl": _iter_jsonl_blocks if blocks else _iter_jsonl,
                "json": _iter_json,
                "csv": _iter_csv,
                "tsv": _iter_tsv,
                "parquet": _iter_parquet,
                "text": _iter_text,
            }[kind](path, text_unit)
        for item in gen:
            n += 1
            yield item
    except (*_DAMAGED, csv.Error, ValueError, RecursionError) as e:
        # A damaged gzip stream or a Parquet footer we cannot read: the rest of the file is lost,
        # which the pipeline reports (and stops on) with the position reached.
        n += 1
        why = " ".join(str(e).split())[:300]  # pyarrow's messages span lines; a report line must not
        yield RawItem(f"{name}:{n}", "error", ("unreadable_file", f"cannot read further: {type(e).__name__}: {why}"))
    if n == 0:
        yield RawItem(f"{name}:0", "error", ("empty_file", "empty file (no records)"))


def _iter_jsonl(path: Path, _unit: str) -> Iterator[RawItem]:
    with _open_binary(path) as fh:
        for i, line in enumerate(fh, 1):
            if i == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.strip():
                yield RawItem(f"{path}:{i}", "line", line)


def _iter_jsonl_blocks(path: Path, _unit: str) -> Iterator[RawItem]:
    line = 1
    rest = b""
    with _open_binary(path) as fh:
        while True:
            try:
                data = fh.read(_BLOCK)
            except _DAMAGED as e:  # a damaged gzip stream: say where it broke
                yield RawItem(
                    f"{path}:{line}", "error", ("unreadable_file", f"cannot read further: {type(e).__name__}: {e}")
                )
                return
            if line == 1 and not rest and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            buf = rest + data
            cut = len(buf) if not data else buf.rfind(b"\n") + 1
            block, rest = buf[:cut], buf[cut:]
            if block.strip():
                yield RawItem(f"{path}:{line}", "lines", block)
            line += block.count(b"\n")
            if not data:
                return


def _iter_json(path: Path, unit: str) -> Iterator[RawItem]:
    """A JSON array, decoded element by element; a .json file holding JSON Lines is read as such."""
    with _text(_open_binary(path)) as fh:
        head = fh.read(_JSON_CHUNK)
        stripped = head.lstrip()
        if not stripped.startswith("["):
            fh.close()
            yield from _iter_jsonl(path, unit)
            return
        yield from _json_array_items(fh, head, str(path))


def _json_array_items(fh: IO[str], buf: str, name: str) -> Iterator[RawItem]:
    dec = json.JSONDecoder()
    line = 1
    pos = len(buf) - len(buf.lstrip()) + 1  # just past "["
    line += buf.count("\n", 0, pos)
    eof = False
    expect_value = True  # right after "[" or ","
    first = True  # right after "[": only here may "]" follow directly (an empty array)

    def skip_ws() -> None:
        nonlocal pos, line
        start = pos
        while pos < len(buf) and buf[pos] in " \t\r\n":
            pos += 1
        line += buf.count("\n", start, pos)

    while True:
        skip_ws()
        if pos >= len(buf) - 1 and not eof:  # keep at least one char of lookahead
            more = fh.read(_JSON_CHUNK)
            buf, pos, eof = buf[pos:] + more, 0, not more
            continue
        if pos >= len(buf):
            yield RawItem(f"{name}:{line}", "error", ("invalid_json", "JSON array is not closed (file truncated?)"))
            return
        ch = buf[pos]
        if ch == "]" and (first or not expect_value):
            return
        if not expect_value:
            if ch != ",":
                yield RawItem(
                    f"{name}:{line}", "error", ("invalid_json", f"expected ',' or ']' in JSON array, got {ch!r}")
                )
                return
            pos += 1
            expect_value = True
            continue
        try:
            obj, end = dec.raw_decode(buf, pos)
        except RecursionError:
            yield RawItem(
                f"{name}:{line}",
                "error",
                ("invalid_json", "JSON array element nested too deeply; rest of file skipped"),
            )
            return
        except json.JSONDecodeError as e:
            if not eof:  # maybe the element is cut by the chunk boundary: read more and retry
                more = fh.read(max(_JSON_CHUNK, len(buf)))
                buf, pos, eof = buf[pos:] + more, 0, not more
                continue
            yield RawItem(
                f"{name}:{line + buf.count(chr(10), pos, e.pos)}",
                "error",
                ("invalid_json", f"malformed JSON array element: {e.msg}; rest of file skipped"),
            )
            return
        if end == len(buf) and not eof:
            # A number at the very end of the buffer may be cut ("12" of "123"): re-read with more text.
            more = fh.read(_JSON_CHUNK)
            buf, pos, eof = buf[pos:] + more, 0, not more
            continue
        yield RawItem(f"{name}:{line}", "obj", obj)
        line += buf.count("\n", pos, end)
        pos = end
        expect_value = first = False


def _iter_delimited(path: Path, delimiter: str) -> Iterator[RawItem]:
    with _text(_open_binary(path)) as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                if len(row) != len(header):
                    yield RawItem(
                        f"{path}:{start}",
                        "error",
                        ("wrong_columns", f"row has {len(row)} columns, header has {len(header)}"),
                    )
                else:
                    yield RawItem(f"{path}:{start}", "obj", dict(zip(header, row)))
            start = reader.line_num + 1


def _iter_csv(path: Path, _unit: str) -> Iterator[RawItem]:
    yield from _iter_delimited(path, ",")


def _iter_tsv(path: Path, _unit: str) -> Iterator[RawItem]:
    yield from _iter_delimited(path, "\t")


def _iter_parquet(path: Path, _unit: str, display: str | None = None) -> Iterator[RawItem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield RawItem(f"{display or path}:{row}", "obj", rec)
    except pa.ArrowException as e:  # every pyarrow error, whatever builtin it also derives from
        raise ValueError(f"not a readable Parquet file: {str(e)[:300]}") from None


def _iter_gz_parquet(path: Path, tmp_dir: Path | None) -> Iterator[RawItem]:
    # Parquet needs random access; decompress to a temporary file rather than into memory.
    fd, tmp = tempfile.mkstemp(suffix=".parquet", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        yield from _iter_parquet(Path(tmp), "file", display=str(path))
    finally:
        os.unlink(tmp)


def _iter_text(path: Path, unit: str) -> Iterator[RawItem]:
    with _text(_open_binary(path)) as fh:
        if unit == "file":
            text = fh.read()
            if text.strip():
                yield RawItem(f"{path}:1", "text", text)
            return
        block: list[str] = []
        start = 0
        for i, line in enumerate(fh, 1):
            if line.strip():
                if not block:
                    start = i
                block.append(line)
            elif block:
                yield RawItem(f"{path}:{start}", "text", "".join(block))
                block = []
        if block:
            yield RawItem(f"{path}:{start}", "text", "".join(block))


def peek_objects(path: Path, n: int = 20) -> list[Any]:
    """The first `n` parsable objects of a file, for shape detection (errors are skipped here)."""
    out: list[Any] = []
    for item in iter_file(path):
        if item.kind == "obj":
            out.append(item.payload)
        elif item.kind == "line":
            try:
                out.append(json.loads(item.payload))
            except (ValueError, RecursionError):
                continue
        elif item.kind == "text":
            out.append(item.payload)
        if len(out) >= n:
            break
    return out
