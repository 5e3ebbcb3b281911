"""Threads on a busy machine: torch's default thread count vs yunque's ThreadPolicy, idle and beside
one CPU-bound process (issue 27 item 8).

    python bench/threads.py                       # demo --quick --from-scratch (training) and decode, both loads
    python bench/threads.py --tasks decode --reps 3

For each load (idle; one competing `while True: pass` process started before and killed after),
the two settings alternate: "default" fixes torch's own count (YUNQUE_THREADS = the cores this
process may use, which is what torch picks), "policy" leaves the count to `yunque.threads`.
Tasks: `train` is the wall time of `yunque demo --quick --from-scratch` (pretraining and LoRA most of it);
`decode` is greedy tokens/s of a 56M model (batch 1, 128 new tokens) after `fit_threads`, as
`yunque generate` runs it. Check `uptime` first: "idle" must be idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DECODE = """
import sys, time, torch
from yunque.formats.hf import load_model
from yunque.generate import Sampling, generate
from yunque.ops import arrange_for_decode_
from yunque.threads import fit_threads
m = load_model(sys.argv[1]).eval()
arrange_for_decode_(m)
threads = fit_threads(m)
prompt = torch.randint(0, m.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).tolist()
generate(m, prompt, Sampling(max_new_tokens=8))  # warm-up
t = time.perf_counter()
generate(m, prompt, Sampling(max_new_tokens=128))
print(f"{128 / (time.perf_counter() - t):.2f} {threads}")
"""


def competitor() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_train(env: dict, work: Path) -> tuple[float, str]:
    out = Path(tempfile.mkdtemp(dir=work))
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "yunque", "demo", "--quick", "--from-scratch", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t
    if p.returncode not in (0, 1):  # 1: ran, below its accuracy bar (a quality result, not a failure here)
        sys.exit(f"demo failed:\n{p.stderr[-2000:]}")
    # the counts the training progress lines showed ("... 2 thr ...")
    counts = {ln.split(" thr")[0].rsplit(" ", 1)[-1] for ln in (p.stdout + p.stderr).splitlines() if " thr" in ln}
    return dt, "/".join(sorted(counts))


def run_decode(env: dict, model: Path) -> tuple[float, str]:
    p = subprocess.run([sys.executable, "-c", DECODE, str(model)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"decode failed:\n{p.stderr[-2000:]}")
    tps, threads = p.stdout.split()[-2:]
    return float(tps), threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="train,decode")
    ap.add_argument("--loads", default="idle,busy")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("YUNQUE_THREADS", "OMP_NUM_THREADS")}
    base["PYTHONPATH"] = str(ROOT)
    settings = {"default": {**base, "YUNQUE_THREADS": str(cores)}, "policy": base}
    print(f"# threads: {cores} cores, load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "model"
        subprocess.run(
            [sys.executable, "-m", "yunque", "init", str(model), "--preset", "base"],
            env=base,
            check=True,
            capture_output=True,
        )
        for task in args.tasks.split(","):
            for load in args.loads.split(","):
                res: dict[str, list[float]] = {"default": [], "policy": []}
                seen: dict[str, str] = {}
                for _ in range(args.reps):
                    for name, env in settings.items():
                        comp = competitor() if load == "busy" else None
                        try:
                            time.sleep(1.0 if comp else 0.0)  # let the competitor show in /proc/stat
                            v, thr = run_train(env, work) if task == "train" else run_decode(env, model)
                        finally:
                            if comp:
                                comp.kill()
                                comp.wait()
                        res[name].append(v)
                        seen[name] = thr
                        print(f"{task} {load} {name}: {v:.2f} (threads {thr})", file=sys.stderr, flush=True)
                d, p = statistics.median(res["default"]), statistics.median(res["policy"])
                unit = "s" if task == "train" else "tok/s"
                gain = d / p if task == "train" else p / d
                rows.append((task, load, unit, d, seen["default"], p, seen["policy"], gain))
    print(f"load average {os.getloadavg()[0]:.2f} at end\n")
    print("| task | load | unit | default | threads | policy | threads | policy speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]} | {r[5]:.1f} | {r[6]} | {r[7]:.2f}x |")


if __name__ == "__main__":
    main()
