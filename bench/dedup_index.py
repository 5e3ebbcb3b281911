"""Near-dedup index: yunque's NearDupIndex vs datasketch's MinHashLSH, memory and time per record.

    PYTHONPATH=. python bench/dedup_index.py [--records 30000] [--num-perm 128] [--threshold 0.8]

Both get the same banding (b, r) and the same signatures of distinct documents (random, as
most records of a real corpus are unique), and each record is queried, then inserted, as
`yunque data prepare` does. Memory is what tracemalloc sees the index hold at the end, per
record; time is the wall time of query + insert, per record. The numbers behind the index
in `yunque/data/dedup.py` (the one structure whose memory grows with the input).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np


class _Sig:  # what MinHashLSH reads of a MinHash
    scheme = "affine32"

    def __init__(self, values: np.ndarray):
        self.hashvalues = values

    def __len__(self) -> int:
        return len(self.hashvalues)


def run(name: str, n: int, sigs: np.ndarray, make, step) -> None:
    index = make()  # timed without tracemalloc, which slows every allocation
    t = time.perf_counter()
    for i in range(n):
        step(index, i, sigs[i])
    dt = time.perf_counter() - t
    del index
    tracemalloc.start()
    index = make()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        step(index, i, sigs[i])
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"| {name} | {held / n / 1024:.1f} KB | {dt / n * 1e6:.0f} us |", flush=True)


def main() -> None:
    from datasketch import MinHashLSH

    from yunque.data.dedup import NearDupIndex

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=30000)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.8)
    args = ap.parse_args()
    n = args.records
    sigs = np.random.default_rng(0).integers(0, 2**32, size=(n, args.num_perm), dtype=np.uint32)
    params = NearDupIndex(args.num_perm, args.threshold)
    print(f"{n} records, {args.num_perm} permutations, bands b={params.b} x rows r={params.r}\n")
    print("| index | memory per record | query + insert per record |\n|---|---|---|")

    def ours(index, i, sig):
        b = sig.tobytes()
        bands = index.bands(b)
        index.matches(b, bands)
        index.add(b, bands)

    def theirs(index, i, sig):
        s = _Sig(sig)
        index.query(s)
        index.insert(i, s)

    run("yunque NearDupIndex", n, sigs, lambda: NearDupIndex(args.num_perm, args.threshold), ours)
    run(
        "datasketch MinHashLSH",
        n,
        sigs,
        lambda: MinHashLSH(num_perm=args.num_perm, params=(params.b, params.r)),
        theirs,
    )


if __name__ == "__main__":
    main()
