"""NF4 kernels for QLoRA: torchao's NF4Tensor vs bitsandbytes, on this machine's device.

    PYTHONPATH=. python bench/nf4.py [--shape 1376 512] [--repeats 7]

Per implementation: quantise time, dequantise time (fp32 and bf16 targets), relative
reconstruction error ||W' - W|| / ||W||, and storage in bits per weight. Runs alternate
between the two implementations; medians. The numbers behind `yunque/quant.py`'s choice.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def med(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=2, default=[1376, 512])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    import bitsandbytes.functional as bnbf
    from torchao.quantization import to_nf4

    torch.manual_seed(0)
    w = (torch.randn(*args.shape) * 0.02).to(args.device)
    n = w.numel()
    rel = lambda a: ((a.float() - w).norm() / w.norm()).item()  # noqa: E731
    impls = {
        "torchao NF4Tensor": dict(
            quant=lambda: to_nf4(w, 64, 256),
            deq=lambda q, dt: q.get_original_weight().to(dt) if dt == torch.float32 else q.to(dt),
            bits=lambda q: (
                8
                * sum(
                    getattr(q, a).numel() * getattr(q, a).element_size()
                    for a in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
                )
                / n
            ),
        ),
        "bitsandbytes": dict(
            quant=lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False),
            deq=lambda q, dt: bnbf.dequantize_4bit(q[0], q[1]).to(dt),
            bits=lambda q: 8 * (q[0].numel() + q[1].absmax.numel() * 4) / n,
        ),
        "bitsandbytes double-quant": dict(
            quant=lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
            deq=lambda q, dt: bnbf.dequantize_4bit(q[0], q[1]).to(dt),
            bits=lambda q: 8 * (q[0].numel() + q[1].absmax.numel() + q[1].state2.absmax.numel() * 4 + 4) / n,
        ),
    }
    rows = {k: {"quant": [], "deq32": [], "deq16": []} for k in impls}
    qs = {k: v["quant"]() for k, v in impls.items()}
    for _ in range(args.repeats):  # interleaved
        for k, v in impls.items():
            t = time.perf_counter()
            qs[k] = v["quant"]()
            rows[k]["quant"].append(time.perf_counter() - t)
            for key, dt in (("deq32", torch.float32), ("deq16", torch.bfloat16)):
                t = time.perf_counter()
                v["deq"](qs[k], dt)
                rows[k][key].append(time.perf_counter() - t)
    print(
        f"weight {args.shape[0]}x{args.shape[1]} on {args.device}, {torch.get_num_threads()} threads; medians of {args.repeats}"  # noqa: E501
    )
    print(f"{'':28s} {'quantise':>10s} {'deq fp32':>10s} {'deq bf16':>10s} {'rel err':>8s} {'bits/w':>7s}")
    for k, v in impls.items():
        r = {m: statistics.median(x) * 1e3 for m, x in rows[k].items()}
        err = rel(v["deq"](qs[k], torch.float32))
        print(f"{k:28s} {r['quant']:8.1f}ms {r['deq32']:8.2f}ms {r['deq16']:8.2f}ms {err:8.4f} {v['bits'](qs[k]):7.3f}")


if __name__ == "__main__":
    main()
