"""The model card of `yunque serve` (GET /yunque/card, /yunque/card/verify): what is served and
where it came from.

What is served: architecture, parameter count, the dtypes of the weights on disk and in memory,
quantisation, the adapter merged in. Where it came from: the `run.json` that a yunque training
run (or `yunque demo`) writes beside its output, found next to or one level above the model and
adapter directories, and only when its `files_sha256` lists files of the served directory. Those
recorded SHA-256 are checked against the files as they are now; a served weights file the record
does not list is "unrecorded", so a record never vouches for weights it does not name.

run.json and the directories are untrusted: names in the record are taken only when they stay
inside the directory the record describes (`yunque.untrusted.inside`, no `..`, no link out), the
record is read only up to `MAX_RECORD_BYTES`, and hashing runs one at a time, reusing a digest while
a file's inode, size and mtime stay the same.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from yunque.data.manifest import sha256_file
from yunque.errors import YunqueError
from yunque.formats.gguf import IMPORT_FILE
from yunque.untrusted import inside, read_json

MAX_RECORD_BYTES = 8 << 20
_ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path")
_RUN_KEYS = (
    "method",
    "seed",
    "steps",
    "tokens",
    "stopped_early",
    "exported_step",
    "best_step",
    "final_metrics",
    "best_metrics",
    "yunque_version",
    "git_commit",
    "world_size",
    "parallel",
    "data",
    "config",
    "packages",
    "hardware",
)


def _dtypes(d: Path) -> dict[str, int]:
    """dtype -> tensor count, from the safetensors headers (nothing is loaded)."""
    from yunque.formats.safetensors_io import SafetensorsFile

    out: dict[str, int] = {}
    for st in sorted(d.glob("*.safetensors")):
        try:
            with SafetensorsFile(st) as f:
                for name in f.keys():
                    dt = str(f.entries[name][0]).removeprefix("torch.")
                    out[dt] = out.get(dt, 0) + 1
        except YunqueError:
            continue
    return out


def _small_json(path: Path):
    """A JSON file read as untrusted (None when absent, too large or not JSON)."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_RECORD_BYTES:
            return None
        return read_json(path)
    except (OSError, YunqueError):
        return None


def find_record(served: Path) -> tuple[Path, dict, dict[str, str]] | None:
    """(record file, its content, {file name in `served`: recorded SHA-256}) for `served`, or None:
    the first of served/run.json, served/../run.json (a training run's `files_sha256`) and
    served/gguf_import.json (`yunque import`'s `files`) that names files of `served`."""
    served = served.resolve()
    for path, key in (
        (served / "run.json", "files_sha256"),
        (served.parent / "run.json", "files_sha256"),
        (served / IMPORT_FILE, "files"),
    ):
        record = _small_json(path)
        files = record.get(key) if isinstance(record, dict) else None
        if not isinstance(files, dict):
            continue
        base, mine = path.parent, {}
        for name, digest in files.items():
            try:
                p = inside(base, name, path)
            except YunqueError:
                continue
            if p.parent == served and isinstance(digest, str):
                mine[p.name] = digest.lower()
        if mine:
            return path, record, mine
    return None


class ModelCard:
    """The facts of the served model (fixed at start) and the check of its recorded hashes (on demand)."""

    def __init__(self, model, model_id: str, model_dir: Path | None, adapter: Path | None, serve_dtype: str) -> None:
        self.model_dir = Path(model_dir).resolve() if model_dir is not None else None
        self.adapter = Path(adapter).resolve() if adapter is not None else None
        self._lock = threading.Lock()
        self._digests: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._facts = self._build(model, model_id, serve_dtype)

    def _build(self, model, model_id: str, serve_dtype: str) -> dict:
        from yunque.formats.model_limits import parameter_count

        c = model.config
        quant = c.extra.get("quantization_config")
        facts: dict = {
            "id": model_id,
            "architecture": c.architecture,
            "parameters": parameter_count(c),
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads,
            "vocab_size": c.vocab_size,
            "context": c.max_position_embeddings,
            "rope_theta": c.rope_theta,
            "tied_embeddings": c.tie_word_embeddings,
            "serving_dtype": serve_dtype,
            "quantization": quant if isinstance(quant, dict) else None,
            "model_dir": self.model_dir.name if self.model_dir else None,
            "weights_dtype": _dtypes(self.model_dir) if self.model_dir else {},
            "adapter": None,
            "imported_from": None,
            "runs": [],
        }
        if self.model_dir is not None:
            imported = _small_json(self.model_dir / IMPORT_FILE)
            if isinstance(imported, dict):
                source = imported.get("source")
                facts["imported_from"] = {
                    "file": Path(source).name if isinstance(source, str) else None,
                    "sha256": imported.get("sha256"),
                    "gguf": imported.get("gguf"),
                }
        if self.adapter is not None:
            cfg = _small_json(self.adapter / "adapter_config.json")
            cfg = cfg if isinstance(cfg, dict) else {}
            facts["adapter"] = {
                "dir": self.adapter.name,
                **{k: cfg.get(k) for k in _ADAPTER_KEYS},
            }
        for of, d in (("model", self.model_dir), ("adapter", self.adapter)):
            found = find_record(d) if d is not None else None
            if found is None:
                continue
            path, run, files = found
            if path.name == IMPORT_FILE:
                if facts["imported_from"] is not None:
                    facts["imported_from"]["files_sha256"] = files
                continue
            facts["runs"].append(
                {
                    "of": of,
                    "run_json": f"{path.parent.name}/{path.name}",
                    **{k: run[k] for k in _RUN_KEYS if k in run},
                    "files_sha256": files,
                }
            )
        return facts

    def facts(self) -> dict:
        return self._facts

    def _sha256(self, p: Path) -> str:
        st = p.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._digests.get(p)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        digest = sha256_file(p)
        self._digests[p] = (stamp, digest)
        return digest

    def verify(self) -> dict:
        """Every served file the training record lists, hashed now: ok / mismatch / missing; served
        weights files it does not list: unrecorded. `verified` only when all recorded files match
        and no served weights file is unrecorded."""
        with self._lock:  # one hashing pass at a time, however many pages ask
            t0 = time.monotonic()
            files: list[dict] = []
            for of, d in (("model", self.model_dir), ("adapter", self.adapter)):
                if d is None:
                    continue
                found = find_record(d)
                recorded = found[2] if found else {}
                weights = sorted(p.name for p in d.glob("*.safetensors") if p.is_file())
                for name in sorted(set(recorded) | set(weights)):
                    files.append(self._check(of, d, name, recorded.get(name)))
            bad = [f for f in files if f["status"] in ("mismatch", "missing", "link")]
            unrecorded = [f for f in files if f["status"] == "unrecorded"]
            if not files:
                verdict = "no_files"
            elif bad:
                verdict = "mismatch"
            elif unrecorded:
                verdict = "unrecorded"
            else:
                verdict = "verified"
            return {
                "verdict": verdict,
                "files": files,
                "checked_at": int(time.time()),
                "seconds": round(time.monotonic() - t0, 3),
            }

    def _check(self, of: str, d: Path, name: str, expected: str | None) -> dict:
        row: dict = {"of": of, "file": name, "recorded": expected, "sha256": None}
        p = d / name
        if p.is_symlink() and not p.resolve().is_relative_to(d):
            row["status"] = "link"
        elif not p.is_file():
            row["status"] = "missing"
        else:
            try:
                row["sha256"] = self._sha256(p)
            except OSError:
                row["status"] = "missing"
                return row
            row["status"] = "unrecorded" if expected is None else ("ok" if row["sha256"] == expected else "mismatch")
        return row
