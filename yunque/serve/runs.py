"""Training runs for the web page (`yunque serve --runs DIR`): loss and learning-rate curves from
metrics.jsonl, the summary of run.json, eval tables (eval.json) and red-team reports (redteam.json).

A run is DIR itself or a folder directly in DIR that holds metrics.jsonl or run.json; eval.json
and redteam.json are taken from the run folder and the folders directly in it (`eval/`,
`redteam/`). DIR is scanned on every listing, so runs that finish while the server is up appear.
A run is named by its folder name and looked up by that name among the folders found, never
joined onto a path.

Everything read here is untrusted: symlinks are not followed, each file is read only up to its
cap, a metrics line that is not a JSON object with a numeric step is counted as skipped (the
page says how many), non-finite numbers are left out, and a series longer than `MAX_POINTS` is
thinned evenly (first and last points kept; the page says so).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from yunque.errors import YunqueError
from yunque.untrusted import read_json

MAX_RUNS = 200
MAX_METRICS_BYTES = 64 << 20
MAX_JSON_BYTES = 8 << 20
MAX_POINTS = 2000
MAX_REPORTS = 20  # eval.json / redteam.json files per run
_SUMMARY = (
    "method",
    "seed",
    "steps",
    "tokens",
    "stopped_early",
    "best_step",
    "final_metrics",
    "best_metrics",
    "yunque_version",
    "git_commit",
)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v, limit: int = 200) -> str | None:
    return v[:limit] if isinstance(v, str) else None


def _numbers(d, limit: int = 64) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    return {str(k)[:64]: v for k, v in list(d.items())[:limit] if _num(v)}


def _plain_file(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _json(p: Path):
    """A capped JSON file, or None (absent, a link, too large, not JSON)."""
    try:
        if not _plain_file(p) or p.stat().st_size > MAX_JSON_BYTES:
            return None
        return read_json(p)
    except (OSError, YunqueError):
        return None


def _thin(n: int) -> list[int]:
    if n <= MAX_POINTS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})


def read_metrics(path: Path) -> dict:
    """metrics.jsonl as series: train {step, loss, lr} and eval {step, <metric>...} (None where a
    row lacks that metric), with counts of skipped lines and of points before thinning."""
    with open(path, "rb") as f:
        raw = f.read(MAX_METRICS_BYTES + 1)
    truncated = len(raw) > MAX_METRICS_BYTES
    lines = raw[:MAX_METRICS_BYTES].decode("utf-8", "replace").splitlines()
    if truncated and lines:
        lines.pop()  # cut mid-line
    train: list[tuple] = []
    evals: list[tuple[float, dict]] = []
    skipped = other = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            skipped += 1
            continue
        if not isinstance(row, dict) or not _num(row.get("step")):
            skipped += 1
            continue
        kind = row.get("kind")
        if kind == "train" and _num(row.get("loss")):
            train.append((row["step"], row["loss"], row["lr"] if _num(row.get("lr")) else None))
        elif kind == "eval":
            evals.append((row["step"], _numbers({k: v for k, v in row.items() if k not in ("step", "kind")})))
        else:
            other += 1  # nonfinite-step records and kinds this page does not draw
    keep = _thin(len(train))
    names = list(dict.fromkeys(k for _, m in evals for k in m))[:16]
    return {
        "train": {
            "step": [train[i][0] for i in keep],
            "loss": [train[i][1] for i in keep],
            "lr": [train[i][2] for i in keep],
        },
        "eval": {"step": [s for s, _ in evals], **{n: [m.get(n) for _, m in evals] for n in names}},
        "points": len(train),
        "skipped_lines": skipped,
        "other_lines": other,
        "truncated": truncated,
    }


def eval_tables(doc) -> dict | None:
    """eval.json (one model, or {"models": [...]} side by side) as rows of name + metrics."""
    if not isinstance(doc, dict):
        return None
    models = doc["models"] if isinstance(doc.get("models"), list) else [doc]
    rows = []
    for m in models[:16]:
        if not isinstance(m, dict) or not isinstance(m.get("metrics"), dict):
            continue
        who = m.get("adapter") or m.get("model")
        rows.append(
            {
                "name": Path(who).name[:120] if isinstance(who, str) else "?",
                "examples": m.get("examples") if _num(m.get("examples")) else None,
                "metrics": _numbers(m["metrics"]),
            }
        )
    if not rows:
        return None
    data = models[0].get("data") if isinstance(models[0], dict) else None
    return {"data": Path(data).name[:120] if isinstance(data, str) else None, "models": rows}


def redteam_report(doc) -> dict | None:
    """redteam.json: per category attempts, failures and rates; the overall ASR; the gate."""
    if not isinstance(doc, dict) or not isinstance(doc.get("categories"), dict):
        return None
    cats = []
    for key, c in list(doc["categories"].items())[:64]:
        if not isinstance(c, dict):
            continue
        row = {
            "key": str(key)[:64],
            "title": _text(c.get("title")),
            "owasp": _text(c.get("owasp")),
            "kind": _text(c.get("kind")),
        }
        for k in ("attempts", "errors", "asr", "no_refusal_rate", "harmful_rate", "over_refusal"):
            row[k] = c.get(k) if _num(c.get(k)) else None
        cats.append(row)
    o = doc.get("overall") if isinstance(doc.get("overall"), dict) else {}
    overall = {k: o.get(k) if _num(o.get(k)) else None for k in ("requests", "errors", "attack_attempts", "asr")}
    ci = o.get("asr_ci95")
    overall["asr_ci95"] = ci if isinstance(ci, list) and len(ci) == 2 and all(map(_num, ci)) else None
    g = doc.get("gate") if isinstance(doc.get("gate"), dict) else None
    gate = None
    if g is not None:
        failed = g.get("failed") if isinstance(g.get("failed"), list) else []
        gate = {
            "fail_above": g.get("fail_above") if _num(g.get("fail_above")) else None,
            "failed": [f[:120] for f in failed[:64] if isinstance(f, str)],
        }
    return {"target": _text(doc.get("target")), "categories": cats, "overall": overall, "gate": gate}


def _reports(d: Path, name: str) -> list[tuple[str, object]]:
    """(path relative to the run, parsed JSON) of `name` in `d` and in the folders directly in it."""
    found = []
    candidates = [d / name] + sorted(
        c / name for c in d.iterdir() if c.is_dir() and not c.is_symlink() and c.name != "checkpoints"
    )
    for p in candidates:
        if len(found) >= MAX_REPORTS:
            break
        doc = _json(p)
        if doc is not None:
            found.append((p.relative_to(d).as_posix(), doc))
    return found


def _is_run(d: Path) -> bool:
    return _plain_file(d / "metrics.jsonl") or _plain_file(d / "run.json")


class RunsDir:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _scan(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        try:
            children = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            children = []
        for d in [self.root, *children]:
            if len(found) >= MAX_RUNS:
                break
            if _is_run(d):
                found.setdefault(d.name, d)
        return found

    def listing(self) -> dict:
        runs = []
        for name, d in self._scan().items():
            run = _json(d / "run.json")
            run = run if isinstance(run, dict) else {}
            runs.append(
                {
                    "name": name,
                    "method": _text(run.get("method")),
                    "steps": run.get("steps") if _num(run.get("steps")) else None,
                    "metrics": _plain_file(d / "metrics.jsonl"),
                }
            )
        return {"dir": self.root.name, "runs": runs}

    def run(self, name: str) -> dict | None:
        """Everything the page shows of run `name`, or None when there is no such run."""
        d = self._scan().get(name)
        if d is None:
            return None
        run = _json(d / "run.json")
        summary = {k: run[k] for k in _SUMMARY if k in run} if isinstance(run, dict) else None
        if summary is not None and isinstance(run.get("data"), dict):
            summary["data_manifest_sha256"] = _text(run["data"].get("manifest_sha256"), 64)
        metrics = read_metrics(d / "metrics.jsonl") if _plain_file(d / "metrics.jsonl") else None
        evals = [{"file": rel, **t} for rel, doc in _reports(d, "eval.json") if (t := eval_tables(doc))]
        redteam = [{"file": rel, **r} for rel, doc in _reports(d, "redteam.json") if (r := redteam_report(doc))]
        return {"name": name, "run": summary, "metrics": metrics, "evals": evals, "redteam": redteam}
