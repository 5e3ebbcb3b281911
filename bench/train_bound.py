"""The ceiling of a SmolLM2-135M LoRA training step in fp32 on this CPU: the frozen linears' GEMMs alone.

    python bench/train_bound.py [--positions 1024] [--reps 5]

Every LoRA step must run, for each of the 30 layers' seven projections, the forward GEMM and the GEMM
of the input gradient (the base is frozen: no weight gradient). This times exactly those, on
`--positions` rows (the demo's 2 x 512), back to back with nothing else: no LoRA, attention, norms,
loss or optimizer. Seconds per position x the epoch's positions is the least time an epoch can take
with PyTorch's fp32 GEMMs, whatever the training loop around them (bench/NOTES.md, "LoRA training on
the real model").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30  # SmolLM2-135M: 9 query heads, 3 key/value heads of 64
# (out, in) of q, k, v, o, gate, up, down
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN)] + [(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    t_rows = args.positions
    weights = [torch.randn(o, i) * 0.02 for o, i in SHAPES]
    x = {i: torch.randn(t_rows, i) for i in (HIDDEN, INTER)}
    g = {o: torch.randn(t_rows, o) for o in (HIDDEN, KV, INTER)}

    def layer() -> None:
        for w in weights:
            o, i = w.shape
            torch.mm(x[i], w.t())  # forward
            torch.mm(g[o], w)  # input gradient

    for _ in range(3):
        layer()
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for _ in range(LAYERS):
            layer()
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    flops = sum(2 * t_rows * o * i * 2 for o, i in SHAPES) * LAYERS
    print(
        f"{torch.get_num_threads()} threads: {s:.3f} s per {t_rows} positions ({flops / s / 1e9:.0f} GFLOPS), "
        f"{s / t_rows * 1e3:.3f} ms per position: x the epoch's positions = its least s/epoch"
    )


if __name__ == "__main__":
    main()
