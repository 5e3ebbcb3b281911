"""Integrity manifest: prove that prepared data is byte-for-byte what `prepare` wrote.

`manifest.json` holds the SHA-256 and size of every input file and every output file, the
resolved config, the yunque version and the library versions that shape the output, and per
split the record count and a Merkle root over per-record hashes. A record hash is SHA-256 of
the record's line (canonical JSON, without the newline); the per-record hashes are also
stored, 32 bytes each, in `hashes/<split>.sha256`, so that verification can name the first
record that differs and say how (changed, deleted, added, reordered, file truncated)
instead of only "hash mismatch".
The Merkle tree is RFC 6962's (leaf = H(0x00 || record hash), node = H(0x01 || left || right)),
computed in one streaming pass with O(log n) memory.

The manifest is not signed: it proves data unchanged relative to the manifest. Pin
`manifest_sha256` (printed by `prepare` and `verify`) to detect a rewritten manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from yunque.data.split import SPLITS
from yunque.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "yunque-data/1"
_LOOKAHEAD = 16


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class MerkleBuilder:
    """RFC 6962 Merkle tree hash over a stream of leaves."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (subtree size, hash); sizes strictly decreasing
        self.count = 0

    def add(self, leaf_data: bytes) -> None:
        node = hashlib.sha256(b"\x00" + leaf_data).digest()
        size = 1
        while self._stack and self._stack[-1][0] == size:
            left = self._stack.pop()[1]
            node = hashlib.sha256(b"\x01" + left + node).digest()
            size *= 2
        self._stack.append((size, node))
        self.count += 1

    def root(self) -> str:
        if not self._stack:
            return hashlib.sha256(b"").hexdigest()
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = hashlib.sha256(b"\x01" + left + node).digest()
        return node.hex()


def merkle_root(leaves: Iterator[bytes]) -> str:
    mb = MerkleBuilder()
    for leaf in leaves:
        mb.add(leaf)
    return mb.root()


class SplitWriter:
    """Writes one split's JSONL, its record-hash file and its Merkle root as records arrive."""

    def __init__(self, out_dir: Path, split: str):
        self.file = f"{split}.jsonl"
        self.hashes_file = f"hashes/{split}.sha256"
        (out_dir / "hashes").mkdir(parents=True, exist_ok=True)
        self._fh = open(out_dir / self.file, "wb")  # noqa: SIM115  (open for the writer's lifetime)
        self._hh = open(out_dir / self.hashes_file, "wb")  # noqa: SIM115
        self.merkle = MerkleBuilder()

    def write(self, line: str) -> None:
        data = line.encode("utf-8")
        self.write_hashed(data, hashlib.sha256(data).digest())

    def write_hashed(self, data: bytes, digest: bytes) -> None:
        """Write a record whose SHA-256 the caller already computed (in a worker process)."""
        self._fh.write(data + b"\n")
        self._hh.write(digest)
        self.merkle.add(digest)

    def flush(self) -> None:
        self._fh.flush()
        self._hh.flush()

    def close(self) -> dict[str, Any]:
        self._fh.close()
        self._hh.close()
        return {
            "file": self.file,
            "hashes": self.hashes_file,
            "records": self.merkle.count,
            "merkle_root": self.merkle.root(),
        }


def write_manifest(
    out_dir: Path,
    *,
    version: str,
    config: dict,
    inputs: list[Path],
    splits: dict[str, dict],
    extra: dict[str, Any] | None = None,
) -> str:
    """Hash every output file (everything under `out_dir` but the manifest) and write manifest.json.
    Returns the manifest's own SHA-256."""
    files = {}
    for p in sorted(out_dir.rglob("*")):
        rel = p.relative_to(out_dir).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith(".tmp"):
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "format": FORMAT,
        "yunque_version": version,
        "config": config,
        "inputs": [{"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in inputs],
        "splits": splits,
        "files": files,
        **(extra or {}),
    }
    data = (json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    (out_dir / MANIFEST).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (is {out_dir} a prepared data directory?)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{path}: manifest is not valid JSON: {str(e) or 'nested too deeply'}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    _check_shape(m, path)
    return m


def _check_shape(m: dict, path: Path) -> None:
    """Every field verification reads, with its type: a malformed manifest is an error naming the field."""

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise DataError(f"{path}: malformed manifest: {field} must be {what}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    files, splits, inputs = m.get("files"), m.get("splits"), m.get("inputs", [])
    need(isinstance(files, dict), "files", "an object")
    for rel, meta in files.items():
        need(
            isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and is_int(meta.get("bytes")),
            f"files[{rel!r}]",
            '{"sha256": hex, "bytes": integer}',
        )
    need(isinstance(splits, dict), "splits", "an object")
    for name, info in splits.items():
        need(
            isinstance(info, dict)
            and all(isinstance(info.get(k), str) for k in ("file", "hashes", "merkle_root"))
            and is_int(info.get("records")),
            f"splits[{name!r}]",
            '{"file", "hashes", "records", "merkle_root"}',
        )
    need(
        isinstance(inputs, list)
        and all(
            isinstance(i, dict) and isinstance(i.get("path"), str) and isinstance(i.get("sha256"), str) for i in inputs
        ),
        "inputs",
        'a list of {"path", "sha256"}',
    )


def _lines(path: Path) -> Iterator[tuple[bytes, bool]]:
    """(line without newline, had newline) for each line of a file."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n"):
                yield line[:-1], True
            else:
                yield line, False


def verify_split(out_dir: Path, split: str, info: dict, files: dict) -> None:
    """Check one split's hash file against the manifest, then every record against the hash file."""
    path = out_dir / info["file"]
    hpath = out_dir / info["hashes"]
    for p in (path, hpath):
        if not p.is_file():
            raise DataError(f"{p}: missing (listed in the manifest)")
    if sha256_file(hpath) != files.get(info["hashes"], {}).get("sha256"):
        raise DataError(f"{hpath}: record-hash file differs from the manifest")
    expected = np.fromfile(hpath, dtype=np.uint8).reshape(-1, 32)
    n = info["records"]
    if len(expected) != n or merkle_root(e.tobytes() for e in expected) != info["merkle_root"]:
        raise DataError(f"{hpath}: record hashes do not give the manifest's count/Merkle root for {split}")

    def exp(i: int) -> bytes | None:
        return expected[i].tobytes() if i < n else None

    window: list[tuple[bytes, bool]] = []
    it = _lines(path)
    i = 0
    while True:
        while len(window) < _LOOKAHEAD + 1:
            nxt = next(it, None)
            if nxt is None:
                break
            window.append((hashlib.sha256(nxt[0]).digest(), nxt[1]))
        if not window:
            break
        got, had_newline = window[0]
        if i >= n:
            raise DataError(f"{path}: record {i} (line {i + 1}) added: file has more records than the manifest's {n}")
        if got != exp(i) or not had_newline:
            raise DataError(f"{path}: {_diagnose(i, n, window, exp)}")
        window.pop(0)
        i += 1
    if i < n:
        raise DataError(
            f"{path}: truncated or records deleted: has {i} records, manifest has {n} (first missing: record {i})"
        )


def _diagnose(i: int, n: int, window: list[tuple[bytes, bool]], exp) -> str:
    got, had_newline = window[0]
    where = f"record {i} (line {i + 1})"
    if got == exp(i) and not had_newline:
        return f"{where}: file truncated (last line has no newline)"
    if len(window) == 1 and not had_newline:
        return f"{where}: file truncated inside this record"
    if len(window) > 1 and got == exp(i + 1) and window[1][0] == exp(i):
        return f"{where}: reordered (records {i} and {i + 1} swapped)"
    later = [exp(j) for j in range(i + 1, min(n, i + _LOOKAHEAD))]
    expected_later = any(h == exp(i) for h, _ in window[1:])
    if got in later and expected_later:
        return f"{where}: reordered (expected record {i} appears later in the file)"
    if got in later:
        return f"{where}: record(s) deleted before this one (expected record {i} is missing)"
    if expected_later:
        return f"{where}: record added (unexpected record before expected record {i})"
    return f"{where}: changed (sha256 differs from the manifest)"


def _on_disk(out_dir: Path) -> list[str]:
    """Every entry under `out_dir` but the manifest, as relative paths; a symlink or a special file
    (device, FIFO) is refused: prepared data holds regular files only, and hashing /dev/zero never ends."""
    out = []
    for p in sorted(out_dir.rglob("*")):
        rel = p.relative_to(out_dir).as_posix()
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise DataError(
                f"{p}: {'a symlink' if p.is_symlink() else 'not a regular file'}; "
                "a prepared data directory holds regular files only"
            )
        if p.is_file() and rel != MANIFEST:
            out.append(rel)
    return out


def verify_dir(out_dir: Path) -> dict:
    """Verify a prepared directory end to end; raises DataError naming the file (and record) at fault.

    Complete, not only consistent: every split training and evaluation read must be in the manifest
    under its own file names, and every file in the directory must be listed, so that deleting a
    split's entries (or adding a file) is caught rather than passing with less checked.
    Returns the manifest plus `inputs_checked` / `inputs_missing` lists and `manifest_sha256`."""
    m = load_manifest(out_dir)
    mpath = out_dir / MANIFEST
    files = m["files"]
    for split in SPLITS:
        info = m["splits"].get(split)
        if info is None:
            raise DataError(
                f"{mpath}: split {split!r} is missing from the manifest (every prepared directory has "
                f"{', '.join(SPLITS)}); its data cannot be verified"
            )
        if (info["file"], info["hashes"]) != (f"{split}.jsonl", f"hashes/{split}.sha256"):
            raise DataError(
                f"{mpath}: split {split!r} names files {info['file']!r}, {info['hashes']!r}; "
                f"training reads {split}.jsonl and hashes/{split}.sha256"
            )
    unknown = sorted(set(m["splits"]) - set(SPLITS))
    if unknown:
        raise DataError(f"{mpath}: unknown split {unknown[0]!r} (splits are {', '.join(SPLITS)})")
    unlisted = [rel for rel in _on_disk(out_dir) if rel not in files and not rel.startswith(".tmp")]
    if unlisted:
        raise DataError(
            f"{out_dir / unlisted[0]}: not listed in the manifest"
            + (f" (and {len(unlisted) - 1} more files)" if len(unlisted) > 1 else "")
            + "; every file in a prepared directory is hashed, so this one was added or the manifest edited"
        )
    for split in SPLITS:
        verify_split(out_dir, split, m["splits"][split], files)
    for rel, meta in files.items():
        p = out_dir / rel
        if rel.startswith("/") or ".." in Path(rel).parts or not p.is_file():
            raise DataError(f"{p}: missing (listed in the manifest)")
        if p.stat().st_size != meta["bytes"]:
            raise DataError(
                f"{p}: size {p.stat().st_size} differs from the manifest's {meta['bytes']} (truncated or appended)"
            )
        if sha256_file(p) != meta["sha256"]:
            raise DataError(f"{p}: sha256 differs from the manifest")
    checked, missing = [], []
    for inp in m["inputs"]:
        p = Path(inp["path"])
        if not p.is_file():
            missing.append(str(p))  # training machines often do not hold the raw inputs
            continue
        try:
            same = sha256_file(p) == inp["sha256"]
        except OSError as e:
            raise DataError(f"{p}: cannot read the input file to verify it ({e.strerror or e})") from None
        if not same:
            raise DataError(f"{p}: input file changed since the data was prepared (sha256 differs)")
        checked.append(str(p))
    digest = hashlib.sha256(mpath.read_bytes()).hexdigest()
    return {**m, "inputs_checked": checked, "inputs_missing": missing, "manifest_sha256": digest}
