"""Data pipeline throughput and memory: synthetic JSONL with planted duplicates and PII.

    python bench/data.py                 # 200 MB and 500 MB, each without and with near dedup, and without any dedup
    python bench/data.py --mb 50 --big-mb 0 --modes off

Each configuration runs in a fresh subprocess so that peak RSS (main process and, separately,
the largest worker) belongs to that run alone. Targets (2 cores): >= 10 MB/s for
clean + exact dedup + PII, >= 2 MB/s with near dedup; peak RSS flat from 200 MB to 500 MB
without dedup (streaming), the dedup indexes adding their size on top.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_WORDS = (  # noqa: SIM905  (a readable word list)
    "the of and to in is was for on that with as by at from his her an were are which this be has "
    "had it not data model train loss token layer batch memory cache server request user system "
    "error value result function return string number config file path network policy security "
    "access report update"
).split()
_PII = [
    "Contact me at {n}.doe{i}@example.org for details.",
    "Call +1 415-555-{p:04d} after five.",
    "card 4111 1111 1111 1111 exp 12/27",
    "AWS key AKIAIOSFODNN7EXAMPL{c} leaked",
    "ssn 123-45-{p:04d} on file",
    "server 10.{a}.{b}.7 is down",
    'password = "{n}Xq9!vT2#pLm8{i}"',
]


def make_corpus(path: Path, mb: float, seed: int = 0) -> dict[str, int]:
    """~`mb` MB of alpaca JSONL; 5% exact duplicates, 5% near duplicates, ~3% records with PII.
    A corpus already in the scratch directory (same size and seed) is reused."""
    meta = path.with_suffix(f".seed{seed}.json")
    if path.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    rng = random.Random(seed)
    target = int(mb * 1e6)
    size = n = exact = near = pii = 0
    recent: list[dict] = []
    with open(path, "w", encoding="utf-8") as fh:
        while size < target:
            r = rng.random()
            if r < 0.05 and recent:
                rec = rng.choice(recent)
                exact += 1
            elif r < 0.10 and recent:
                base = rng.choice(recent)
                words = base["output"].split()
                for _ in range(max(1, len(words) // 60)):  # ~1.5% of words changed: Jaccard ~0.9
                    words[rng.randrange(len(words))] = rng.choice(_WORDS)
                rec = {**base, "output": " ".join(words)}
                near += 1
            else:
                out = " ".join(rng.choices(_WORDS, k=rng.randint(80, 220)))
                if rng.random() < 0.03:
                    t = rng.choice(_PII).format(
                        n="ana", i=n % 97, p=n % 10000, c=chr(65 + n % 26), a=n % 250, b=n % 199
                    )
                    out = f"{out[:200]} {t} {out[200:]}"
                    pii += 1
                rec = {"instruction": " ".join(rng.choices(_WORDS, k=rng.randint(6, 20))), "input": "", "output": out}
                recent.append(rec)
                if len(recent) > 2000:
                    recent.pop(rng.randrange(len(recent)))
            line = json.dumps(rec) + "\n"
            fh.write(line)
            size += len(line)
            n += 1
    out = {"records": n, "planted_exact": exact, "planted_near": near, "planted_pii": pii, "bytes": size}
    meta.write_text(json.dumps(out))
    return out


def run_one(inp: str, out: str, mode: str) -> None:
    """Child process: one prepare run; prints a JSON line with its figures."""
    sys.path.insert(0, str(ROOT))
    from yunque.config import from_dict
    from yunque.data.config import DataConfig
    from yunque.data.pipeline import prepare

    # mode: "off" (clean + exact dedup + PII), "remove" (+ near dedup), "nodedup" (clean + PII only:
    # no index at all, so peak RSS shows the streaming floor)
    dedup = {"exact": False, "near": "off"} if mode == "nodedup" else {"near": mode}
    cfg = from_dict(DataConfig, {"dedup": dedup, "workers": 2})
    t = time.perf_counter()
    r = prepare([inp], out, cfg, log=lambda *_: None)
    dt = time.perf_counter() - t
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    self_kb, child_kb = me.ru_maxrss, kids.ru_maxrss
    print(
        json.dumps(
            {
                "seconds": dt,
                "records_in": r.records_in,
                "kept": r.records_kept,
                "dropped": r.dropped,
                "pii": r.report["pii_findings"],
                "overlap": r.report["cross_split_overlap"],
                "rss_main_mb": self_kb / 1024,
                "rss_worker_mb": child_kb / 1024,
                "cpu_main": me.ru_utime + me.ru_stime,
                "cpu_workers": kids.ru_utime + kids.ru_stime,
            }
        )
    )


def measure(inp: Path, mode: str, tmp: Path) -> dict:
    out = tmp / f"out-{mode}-{inp.stem}"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(inp), str(out), mode], capture_output=True, text=True, check=True
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = inp.stat().st_size / 1e6
    res["mb_per_s"] = mb / res["seconds"]
    # On a shared machine wall time measures the neighbours; CPU time does not. With 2 dedicated
    # cores a run takes at least its serial main-process CPU and at least half of all CPU.
    res["mb_per_s_2core"] = mb / max(res["cpu_main"], (res["cpu_main"] + res["cpu_workers"]) / 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--big-mb", type=float, default=500, help="size for the streaming RSS check (0: skip)")
    ap.add_argument("--tmp", default=None)
    ap.add_argument(
        "--modes", default="off,remove,nodedup", help="comma list of: off (exact dedup), remove (+ near), nodedup"
    )
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        run_one(*a.child)
        return
    tmp = Path(a.tmp or tempfile.mkdtemp(prefix="yunque-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}  scratch: {tmp}")
    small = tmp / f"corpus-{int(a.mb)}mb.jsonl"
    t = time.perf_counter()
    planted = make_corpus(small, a.mb)
    print(f"corpus {small.name}: {planted} (generated in {time.perf_counter() - t:.0f}s)")
    names = {"off": "clean+exact+PII", "remove": "clean+exact+PII+near", "nodedup": "clean+PII, no dedup"}
    modes = a.modes.split(",")
    rows = [(names[m], small, m) for m in modes]
    if a.big_mb:
        big = tmp / f"corpus-{int(a.big_mb)}mb.jsonl"
        make_corpus(big, a.big_mb, seed=1)
        rows += [(names[m] + " (big)", big, m) for m in modes]
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(
        f"{'config':28s} {'input MB':>8s} {'MB/s':>6s} {'2-core MB/s':>11s} {'s':>7s} {'CPU main/workers s':>18s} "
        f"{'main RSS MB':>11s} {'worker RSS MB':>13s}  dropped"
    )
    for name, inp, mode in rows:
        r = measure(inp, mode, tmp)
        cpu = f"{r['cpu_main']:.0f}/{r['cpu_workers']:.0f}"
        print(
            f"{name:28s} {inp.stat().st_size / 1e6:8.0f} {r['mb_per_s']:6.1f} {r['mb_per_s_2core']:11.1f} {r['seconds']:7.1f} {cpu:>18s} "  # noqa: E501
            f"{r['rss_main_mb']:11.0f} {r['rss_worker_mb']:13.0f}  {r['dropped']} overlap={r['overlap']}"
        )
    print(
        f"load average after: {os.getloadavg()[0]:.1f}  (MB/s: wall clock; 2-core MB/s: from CPU time, see measure())"
    )
    print("targets: >= 10 MB/s without near dedup, >= 2 MB/s with it; RSS without near dedup flat in input size")


if __name__ == "__main__":
    main()
