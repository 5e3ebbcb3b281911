"""Reading what arrives from untrusted places (JSON files, the paths written inside them), and
writing outputs where someone else may have planted a symlink.

Model directories, adapters, prepared data and shard indexes come from anywhere. A JSON file
that is not UTF-8, is nested a million levels deep or is not JSON at all is one error naming
the file; a file name read from such a file (a shard index's `../../etc/passwd`, a manifest's
absolute path, a symlink planted to point elsewhere) is refused unless it stays inside the
directory it was read from. An output file is never opened through a symlink at its name:
whole files are written to a fresh temporary file and renamed over the name (which replaces a
link instead of writing to its target), and a file kept open for appending is opened with
O_NOFOLLOW.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from yunque.errors import YunqueError


def read_json(path: Path, error: type[YunqueError] = YunqueError) -> Any:
    """The parsed JSON of `path`; every way it can be unreadable is `error` naming the file (and line)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: invalid JSON: not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except ValueError as e:  # an integer literal longer than Python converts
        raise error(f"{path}: invalid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path}: invalid JSON: nested too deeply") from None


def _hf_cache_blobs(base: Path) -> Path | None:
    """`<repo>/blobs` when `base` is a Hugging Face cache snapshot (`<repo>/snapshots/<revision>`),
    whose files are symlinks into the repository's blob store."""
    if base.parent.name == "snapshots" and base.parent.parent.name.startswith(("models--", "datasets--")):
        return base.parent.parent / "blobs"
    return None


def inside(base: Path, name: Any, source: str | Path, error: type[YunqueError] = YunqueError) -> Path:
    """`base / name` for a file name read from `source`, refused unless it stays inside `base`.

    `name` must be a relative path without `..`; if it exists, what it resolves to (through any
    symlink) must be inside `base` too (or in the blob store of the Hugging Face cache repository
    `base` is a snapshot of)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{source}: file name {name!r} is not a non-empty string")
    rel = Path(name)
    if len(name) > 4096 or any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in rel.parts):
        raise error(f"{source}: file name {name[:80]!r}... is too long")
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise error(f"{source}: file name {name!r} points outside {base} (only paths inside it are read)")
    path = base / rel
    if os.path.lexists(path):
        real = path.resolve()
        roots = [base.resolve()]
        blobs = _hf_cache_blobs(base.resolve())
        if blobs is not None:
            roots.append(blobs)
        if not any(real.is_relative_to(r) for r in roots):
            raise error(f"{source}: {name} is a link to {real}, outside {base} (only files inside it are read)")
    return path


def write_replacing(path: Path, data: str | bytes) -> None:
    """Write `path` whole: into a new temporary file beside it, then renamed over it. A symlink at
    `path` is replaced, never followed, and readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # O_EXCL: never a link
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def open_append(path: Path, error: type[YunqueError] = YunqueError):
    """`path` opened for appending text, refusing to go through a symlink at its name."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(
                f"{path}: is a symlink; refusing to write through it (remove it or use another out_dir)"
            ) from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def refuse_symlink(path: Path, error: type[YunqueError] = YunqueError) -> None:
    """An output file or directory we are about to write into must not be a symlink to elsewhere."""
    if path.is_symlink():
        raise error(
            f"{path}: is a symlink (to {os.readlink(path)}); refusing to write through it "
            "(remove it or use another out_dir)"
        )
