"""PII detector quality and speed.

Prints per-type precision/recall on tests/fixtures/pii_cases.jsonl (span level, exact type,
overlap = hit) and single-core scrub() throughput in MB/s on synthetic documents:
English prose with numbers, dates and code, and PII in roughly one document in five.

    PYTHONPATH=. python bench/pii_eval.py [--mb 4] [--docs-kb 3]
    PYTHONPATH=. python bench/pii_eval.py --compare main [--rounds 5]

--compare REV times the scrubber of git revision REV against this tree on the same documents,
in alternating child processes (A B A B ...), so that a busy machine slows both alike; it
reports the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the of and to in is was for on that with as by at from it this be are have not or which an were but had "
    "their its also has one more new first been after who other than into when time two they some may only most "
    "over such many these city system would made later used can between during about under where both while "
    "school state through each then known team year world well government part since people found music however "
    "company model data training network result method value number performance memory process report support "
    "service release version user users server file files client request response level policy rate change "
    "research history program public early called three several including large small high low open national"
).split()


def _sentence(r: random.Random) -> str:
    words = [r.choice(WORDS) for _ in range(r.randint(8, 22))]
    roll = r.random()
    if roll < 0.25:
        words.insert(r.randrange(len(words)), str(r.randint(1900, 2030)))
    elif roll < 0.35:
        words.insert(r.randrange(len(words)), f"{r.randint(1, 999)},{r.randint(100, 999)}")
    elif roll < 0.42:
        words.insert(r.randrange(len(words)), f"{r.randint(2000, 2025)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}")
    elif roll < 0.45:
        words.insert(r.randrange(len(words)), f"v{r.randint(0, 9)}.{r.randint(0, 20)}.{r.randint(0, 99)}")
    s = " ".join(words)
    return s[0].upper() + s[1:] + r.choice([".", ".", ".", "?", ":", ";"])


def synthetic_docs(total_bytes: int, doc_bytes: int, pii_snippets: list[str], seed: int = 0) -> list[str]:
    r = random.Random(seed)
    docs, size = [], 0
    while size < total_bytes:
        parts, n = [], 0
        while n < doc_bytes:
            s = _sentence(r)
            if r.random() < 0.01:  # ~1 in 5 documents carries a PII snippet
                s = r.choice(pii_snippets)
            parts.append(s)
            n += len(s) + 1
        doc = " ".join(parts)
        docs.append(doc)
        size += len(doc.encode())
    return docs


def time_docs(docs: list[str], repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` CPU seconds of scan() and scrub() over `docs`, and the wall seconds."""
    from yunque.data.pii import scan, scrub

    out = {}
    for name, fn in (("scan", scan), ("scrub", scrub)):
        cpu = wall = float("inf")
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            for d in docs:
                fn(d)
            cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - w0)
        out[name], out[name + "_wall"] = cpu, wall
    return out


def quality(cases: list[dict]) -> None:
    from yunque.data.pii import PII_TYPES, evaluate_spans

    res = evaluate_spans(cases)
    print(f"labelled set: {len(cases)} snippets ({sum(not c['spans'] for c in cases)} with no PII), "
          f"{sum(len(c['spans']) for c in cases)} gold spans")  # fmt: skip
    print(f"{'type':<18} {'precision':>9} {'recall':>7} {'pred':>5} {'gold':>5}")
    for t in PII_TYPES:
        m = res[t]
        print(f"{t:<18} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['n_pred']:>5} {m['n_gold']:>5}")
    worst = min(min(m["precision"], m["recall"]) for m in res.values())
    print(f"min over types of min(P, R): {worst:.3f}")


def compare(rev: str, docs: list[str], rounds: int) -> None:
    """Old (`rev`) against this tree, alternating child processes on the same documents."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev, "yunque"], cwd=ROOT, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        docs_file = Path(tmp) / "docs.json"
        docs_file.write_text(json.dumps(docs), encoding="utf-8")
        mb = sum(len(d.encode()) for d in docs) / 1e6
        runs: dict[str, list[dict[str, float]]] = {rev: [], "this tree": []}
        for _ in range(rounds):
            for label, path in ((rev, tmp), ("this tree", str(ROOT))):
                env = {**os.environ, "PYTHONPATH": path}
                out = subprocess.run([sys.executable, __file__, "--time-docs", str(docs_file)], env=env, check=True,
                                     capture_output=True, text=True).stdout  # fmt: skip
                runs[label].append(json.loads(out))
        print(f"{mb:.1f} MB in {len(docs)} docs, {rounds} alternating rounds, median MB/s per core (CPU time):")
        med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
        for name in ("scan", "scrub"):
            old, new = mb / med[rev][name], mb / med["this tree"][name]
            print(f"{name:<6} {rev}: {old:6.1f}   this tree: {new:6.1f}   ratio {new / old:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=4.0, help="MB of synthetic text to time")
    ap.add_argument("--docs-kb", type=float, default=3.0, help="document size in KB")
    ap.add_argument("--cases", type=Path, default=ROOT / "tests/fixtures/pii_cases.jsonl")
    ap.add_argument("--compare", metavar="REV", help="time git revision REV's scrubber against this tree")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds for --compare")
    ap.add_argument("--time-docs", type=Path, help=argparse.SUPPRESS)  # child of --compare
    args = ap.parse_args()

    if args.time_docs:
        print(json.dumps(time_docs(json.loads(args.time_docs.read_text(encoding="utf-8")))))
        return
    cases = [json.loads(line) for line in args.cases.read_text(encoding="utf-8").splitlines() if line.strip()]
    snippets = [c["text"] for c in cases if c["spans"]]
    docs = synthetic_docs(int(args.mb * 1e6), int(args.docs_kb * 1e3), snippets)
    if args.compare:
        compare(args.compare, docs, args.rounds)
        return
    quality(cases)
    nbytes = sum(len(d.encode()) for d in docs)
    # CPU time of this process is the single-core figure; wall time is shown too because on
    # a shared machine it also counts time spent waiting for the core.
    t = time_docs(docs)
    mb = nbytes / 1e6
    for name in ("scan", "scrub"):
        print(f"{name:<6} {mb:.1f} MB in {len(docs)} docs: {mb / t[name]:6.1f} MB/s per core (CPU time), "
              f"{mb / t[name + '_wall']:6.1f} MB/s wall")  # fmt: skip
    from yunque.data.pii import scrub

    found = sum(sum(scrub(d).findings.values()) for d in docs)
    print(f"findings in synthetic corpus: {found} ({found / len(docs):.2f} per doc)")


if __name__ == "__main__":
    main()
