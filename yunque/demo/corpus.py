"""An offline pretraining corpus from the Python standard library's own source text.

Why this text: every machine that can run yunque has it (it ships with the interpreter
that runs us), so the demo needs no download; it is real, human-written English and code
from hundreds of authors over thirty years, not generated filler; and its licence (PSF)
allows it. It is read as *text*: files are parsed with `ast` from their bytes, never
imported, so building the corpus runs none of the code it reads.

What goes in, in this order, each document tagged with a kind and its source:

    reference  the Python Language Reference sections that `help()` shows, shipped as the
               string literals of `pydoc_data/topics.py` (read with `ast.literal_eval`)
    text       licence, README, history and design notes shipped as .txt/.rst files
    docstring  module, class and function docstrings, dedented (`inspect.cleandoc`)
    comment    blocks of consecutive full-line `#` comments, the `#` markers removed
    code       each module's code with its docstrings and full-line comments taken out
               (they are already in the corpus above), so no text appears twice

Cleaning decisions: test suites (`test/`, `tests/`, `idle_test/`) are skipped: they are
mostly fixtures and deliberately malformed input, and parsing them would triple the build
time. Doctest examples (`>>> f(2)` and the printed result) are *kept*: they are real usage,
and "code, then its exact output" is the prompt -> answer pattern the fine-tuned tasks use.
Docstrings and comment blocks with fewer than `min_words` words ("Return self.") are
dropped, and identical texts are kept once (first occurrence in sorted file order), which
removes e.g. the many copies of the same licence header. Encoding cookies and shebangs
are not text and are dropped.

Output (`build_corpus(out_dir)`): `corpus.txt` holds documents separated by one blank line,
the block shape `yunque data prepare` reads as `text` records; inside a document blank
lines are removed so that a blank line always means "next document". `corpus.sources.tsv`
has one line per document, `kind<TAB>path:line` relative to the stdlib folder, so every
byte can be traced to the file and line it came from. `corpus.json` records the Python
version, the sizes per kind, the build time and the SHA-256 of `corpus.txt`. Files are
visited in sorted relative-path order, so one Python version gives the same bytes on
every machine; another version (or a distribution that splits the stdlib into packages)
gives a different corpus, and the SHA-256 says so.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import time
import tokenize
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from yunque.errors import DataError

KINDS = ("reference", "text", "docstring", "comment", "code")
MIN_BYTES = 5_000_000
PROGRESS_EVERY_S = 10.0  # at most this long without a line from `log` while parsing
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib-dynload", "ensurepip"}
_TEXT_EXT = {".txt", ".rst"}
_COMMENT = re.compile(r"^[ \t]*#")
_BLANK_RUN = re.compile(r"\n\s*(?=\n)")  # any whitespace-only line, form feeds included
_WORD = re.compile(r"[A-Za-z]{2,}")


@dataclass
class CorpusInfo:
    path: str
    sources_path: str
    sha256: str
    bytes: int
    documents: int
    seconds: float
    python: str
    stdlib: str
    per_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> {"documents", "bytes"}
    duplicates_dropped: int = 0


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _one_doc(text: str) -> str:
    """A document with no blank line inside, so that blank lines can separate documents."""
    return _BLANK_RUN.sub("", text.strip().replace("\r\n", "\n").replace("\r", "\n")).strip()


def _enough_words(text: str, min_words: int) -> bool:
    return len(_WORD.findall(text)) >= min_words


def _docstring_nodes(tree: ast.Module) -> Iterator[ast.Expr]:
    """The docstring expressions of the module and of every class/function, nested ones and those
    under `if`/`try`/`with` included. Only statement lists are visited, not every expression:
    a full `ast.walk` would cost more than the parse itself."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            yield body[0]
        blocks = [getattr(node, name, None) or [] for name in ("body", "orelse", "finalbody")]
        blocks += [h.body for h in getattr(node, "handlers", None) or []]
        for block in blocks:
            stack.extend(c for c in block if isinstance(c, _COMPOUND))


_COMPOUND = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.Try, ast.With, ast.For, ast.While)


def _extract_module(args: tuple[str, str, int]) -> list[tuple[str, str, str]] | str:
    """(kind, "relpath:line", text) for one .py file; an error string if it cannot be parsed."""
    path, rel, min_words = args
    data = Path(path).read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        source = data.decode(encoding)
        tree = ast.parse(source, filename=rel)
    except (SyntaxError, UnicodeDecodeError, LookupError, ValueError) as e:
        return f"{rel}: {e}"
    # ast counts only \n, \r\n and \r as line ends; str.splitlines also splits at form feeds.
    lines = source.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    taken = [False] * (len(lines) + 1)  # 1-based: line belongs to a docstring or a comment
    out: list[tuple[str, str, str]] = []
    for expr in sorted(_docstring_nodes(tree), key=lambda e: e.lineno):
        first, last = lines[expr.lineno - 1], lines[expr.end_lineno - 1]
        # Only whole-line docstrings leave the code: `def f(): "doc"` keeps its line.
        if not first[: expr.col_offset].strip() and not last[expr.end_col_offset :].strip():
            for i in range(expr.lineno, expr.end_lineno + 1):
                taken[i] = True
        doc = _one_doc(_cleandoc(expr.value.value))
        if doc and _enough_words(doc, min_words):
            out.append(("docstring", f"{rel}:{expr.lineno}", doc))
    block: list[str] = []
    start = 0
    for i, line in enumerate(lines, 1):
        is_comment = not taken[i] and _COMMENT.match(line) is not None
        if is_comment:
            taken[i] = True
            body = line.lstrip()[1:]
            if i <= 2 and (body.startswith("!") or "coding" in body):
                continue  # shebang / encoding cookie
            if not block:
                start = i
            block.append(body.removeprefix(" "))
        if block and (not is_comment or i == len(lines)):
            text = _one_doc("\n".join(block).rstrip("#").strip())
            if text and _enough_words(text, min_words):
                out.append(("comment", f"{rel}:{start}", text))
            block = []
    code = _one_doc("\n".join(line.rstrip() for i, line in enumerate(lines, 1) if not taken[i]))
    if code:
        out.append(("code", f"{rel}:1", code))
    return out


def _cleandoc(doc: str) -> str:
    import inspect

    return inspect.cleandoc(doc)


def _reference_topics(root: Path) -> list[tuple[str, str, str]]:
    """The Language Reference topics `help()` prints, from the dict literal in pydoc_data/topics.py."""
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [("reference", f"pydoc_data/topics.py#{name}", _one_doc(topics[name])) for name in sorted(topics)]
    return []


def reference_topics(root: Path | None = None) -> list[tuple[str, str, str]]:
    """(kind, source, text) of the Language Reference topics; empty where this Python lacks pydoc_data."""
    return _reference_topics(root or stdlib_dir())


def _text_files(root: Path, rels: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for rel in rels:
        text = _one_doc((root / rel).read_text(encoding="utf-8", errors="replace"))
        if text:
            out.append(("text", f"{rel}:1", text))
    return out


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """Relative paths of the .py files and the text files to read, sorted."""
    py, txt = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            suffix = Path(name).suffix
            if suffix == ".py" and rel != "pydoc_data/topics.py":
                py.append(rel)
            elif suffix in _TEXT_EXT or name.startswith("README"):
                txt.append(rel)
    return sorted(py), sorted(txt)


def _collect(results: Iterator, total: int, log) -> list:
    out, t0 = [], time.perf_counter()
    last = t0
    for res in results:
        out.append(res)
        now = time.perf_counter()
        if log is not None and now - last >= PROGRESS_EVERY_S and len(out) < total:
            rate = len(out) / (now - t0)
            log(f"parsed {len(out)}/{total} stdlib modules | {rate:.0f}/s | eta {(total - len(out)) / rate:.0f} s")
            last = now
    return out


def iter_documents(
    root: Path | None = None, kinds: tuple[str, ...] = KINDS, min_words: int = 3, workers: int | None = None, log=None
) -> Iterator[tuple[str, str, str]]:
    """(kind, source, text) in corpus order, before de-duplication. Parsing runs in `workers`
    processes (default: the CPU count, at most 4); results come back in file order. `log` gets
    "parsed n/N modules" lines while parsing takes long (see PROGRESS_EVERY_S)."""
    root = root or stdlib_dir()
    if not (root / "os.py").is_file():
        raise DataError(f"{root}: not a Python standard library folder (no os.py)")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise DataError(f"corpus kinds {sorted(unknown)} are unknown (known: {', '.join(KINDS)})")
    py, txt = _walk(root)
    by_kind: dict[str, list[tuple[str, str, str]]] = {k: [] for k in KINDS}
    if "reference" in kinds:
        by_kind["reference"] = _reference_topics(root)
    if "text" in kinds:
        by_kind["text"] = _text_files(root, txt)
    if {"docstring", "comment", "code"} & set(kinds):
        jobs = [(str(root / rel), rel, min_words) for rel in py]
        n = workers if workers is not None else min(4, os.cpu_count() or 1)
        if n > 1:
            with ProcessPoolExecutor(n) as pool:
                results = _collect(pool.map(_extract_module, jobs, chunksize=16), len(jobs), log)
        else:
            results = _collect(map(_extract_module, jobs), len(jobs), log)
        for res in results:
            if isinstance(res, str):
                continue  # a stdlib file this Python cannot parse (none in 3.10-3.13 outside tests)
            for item in res:
                by_kind[item[0]].append(item)
    for kind in KINDS:
        if kind in kinds:
            yield from by_kind[kind]


def build_corpus(
    out_dir: str | Path,
    kinds: tuple[str, ...] = KINDS,
    min_words: int = 3,
    min_bytes: int = MIN_BYTES,
    root: Path | None = None,
    workers: int | None = None,
    log=None,
) -> CorpusInfo:
    """Write corpus.txt, corpus.sources.tsv and corpus.json under `out_dir`; see the module docstring.
    Raises DataError when the result is smaller than `min_bytes` (a stripped-down Python install)."""
    t0 = time.perf_counter()
    root = Path(root) if root else stdlib_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    per_kind = {k: {"documents": 0, "bytes": 0} for k in kinds}
    digest = hashlib.sha256()
    total = docs = dups = 0
    tmp_txt, tmp_src = out / ".corpus.txt.tmp", out / ".corpus.sources.tsv.tmp"
    with open(tmp_txt, "wb") as ft, open(tmp_src, "w", encoding="utf-8", newline="\n") as fs:
        for kind, source, text in iter_documents(root, kinds, min_words, workers, log):
            data = text.encode("utf-8", errors="surrogateescape")
            key = hashlib.blake2b(data, digest_size=16).digest()
            if key in seen:
                dups += 1
                continue
            seen.add(key)
            chunk = (b"\n" if docs else b"") + data + b"\n"
            ft.write(chunk)
            digest.update(chunk)
            fs.write(f"{kind}\t{source}\n")
            per_kind[kind]["documents"] += 1
            per_kind[kind]["bytes"] += len(data)
            total += len(chunk)
            docs += 1
    if total < min_bytes:
        tmp_txt.unlink()
        tmp_src.unlink()
        raise DataError(
            f"{root}: the standard library gives only {total:,} bytes of text "
            f"(need {min_bytes:,}); is this a stripped-down Python install?"
        )
    os.replace(tmp_txt, out / "corpus.txt")
    os.replace(tmp_src, out / "corpus.sources.tsv")
    info = CorpusInfo(
        path=str(out / "corpus.txt"),
        sources_path=str(out / "corpus.sources.tsv"),
        sha256=digest.hexdigest(),
        bytes=total,
        documents=docs,
        seconds=round(time.perf_counter() - t0, 3),
        python=sys.version.split()[0],
        stdlib=str(root),
        per_kind=per_kind,
        duplicates_dropped=dups,
    )
    (out / "corpus.json").write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
    return info


def read_corpus(out_dir: str | Path) -> Iterator[tuple[str, str, str]]:
    """(kind, source, text) back from a built corpus folder, in order."""
    out = Path(out_dir)
    docs = (out / "corpus.txt").read_text(encoding="utf-8", errors="surrogateescape").split("\n\n")
    sources = (out / "corpus.sources.tsv").read_text(encoding="utf-8").splitlines()
    if len(docs) != len(sources):
        raise DataError(f"{out}: corpus.txt has {len(docs)} documents but corpus.sources.tsv {len(sources)} lines")
    for doc, line in zip(docs, sources):
        kind, source = line.split("\t", 1)
        yield kind, source, doc.rstrip("\n")


if __name__ == "__main__":
    info = build_corpus(sys.argv[1] if len(sys.argv) > 1 else "runs/corpus")
    print(
        f"{info.documents:,} documents, {info.bytes / 1e6:.2f} MB in {info.seconds:.2f} s "
        f"(Python {info.python}); sha256 {info.sha256}"
    )
    for kind, v in info.per_kind.items():
        print(f"  {kind:10s} {v['documents']:7,} docs {v['bytes'] / 1e6:6.2f} MB")
