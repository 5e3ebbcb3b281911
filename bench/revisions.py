"""Before/after: one benchmark script run from two checkouts in turn (A B A B ...), its tables compared.

    python bench/revisions.py --before ../old-checkout --rounds 3 -- bench/train.py --sections step --reps 1
    python bench/revisions.py --before ../old-checkout --rounds 3 -- bench/generate.py --sizes 56M --reps 1

Each round runs the script once in each checkout (its own copy of the script, its own yunque on
PYTHONPATH), so slow drift of the machine hits both alike. Every Markdown table row the script
prints is keyed by its leading text cells; each numeric cell gets the median over rounds per
checkout, the after/before ratio and the spread (max/min - 1) of each side's own rounds, which is
the run's noise: a ratio inside it is no change. Columns whose values are the peer's (transformers)
come out the same in both checkouts within the noise, which checks the noise estimate.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

NUMBER = re.compile(r"^-?[\d.]+(?:e-?\d+)?(?:x|%)?$")


KEYS = {"model", "method", "dtype", "precision", "batch", "threads", "size"}


def parse_tables(text: str) -> dict[tuple[str, ...], dict[str, float]]:
    """Rows of every Markdown table: (text cells and KEYS cells) -> {column name: number}."""
    rows: dict[tuple[str, ...], dict[str, float]] = {}
    header: list[str] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if not header:
            header = cells
            continue
        pairs = list(zip(header, cells, strict=False))
        key = tuple(
            f"{h} {c}" if h in KEYS and NUMBER.match(c) else c for h, c in pairs if h in KEYS or not NUMBER.match(c)
        )
        rows[key] = {h: float(c.rstrip("x%")) for h, c in pairs if h not in KEYS and NUMBER.match(c)}
    return rows


def run(checkout: Path, argv: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    p = subprocess.run([sys.executable, *argv], cwd=checkout, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {argv[0]} failed in {checkout}:\n{p.stderr[-3000:]}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="the older checkout")
    ap.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--columns", default="", help="comma-separated column names to compare (default: all)")
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")
    args = ap.parse_args()
    argv = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not argv:
        ap.error("give the benchmark after --")
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for side in ("before", "after"):
            out = run(getattr(args, side).resolve(), argv)
            results[side].append(parse_tables(out))
            print(f"round {r + 1}/{args.rounds} {side} done, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    wanted = {c for c in args.columns.split(",") if c}
    print(f"# {' '.join(argv)}: {args.rounds} rounds, before = {args.before}, after = {args.after}")
    print("| row | column | before | after | after/before | noise before | noise after |")
    print("|---|---|---|---|---|---|---|")
    for key in results["after"][0]:
        for col in results["after"][0][key]:
            if wanted and col not in wanted:
                continue
            b = [t[key][col] for t in results["before"] if col in t.get(key, {})]
            a = [t[key][col] for t in results["after"] if col in t.get(key, {})]
            if not a or not b:
                continue
            mb, ma = statistics.median(b), statistics.median(a)
            spread = lambda v: max(v) / min(v) - 1 if min(v) > 0 else float("nan")  # noqa: E731
            ratio = ma / mb if mb else float("nan")
            print(
                f"| {' / '.join(key)} | {col} | {mb:.4g} | {ma:.4g} | {ratio:.3f} | {spread(b):.1%} | {spread(a):.1%} |"
            )


if __name__ == "__main__":
    main()
