"""Weight-only int8/int4 linears on CPU: PyTorch's packed kernels against dequantise-then-matmul.

    PYTHONPATH=. python bench/quantize_matmul.py [--threads 2] [--clock cpu] [--repeats 30]

For each (in, out) shape, rows of x (1, 8, 16, 32: decode batches; 128: a prefill) and activation
dtype (fp32, bf16): the full-precision linear as yunque decodes it (oneDNN-packed,
`yunque/cpu/decode.py`); int8 per channel and int4 group 32 through
`torch.ops.aten._weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` (on the activations as they
are, and for fp32 on activations cast to bf16) and through dequantise-then-`F.linear`; and
yunque's `QuantLinear`, which picks among them. Variants alternate round by round; each row is the
fastest and the median microseconds of one call (on a shared machine the fastest round is the one
least disturbed by other processes; `--clock cpu` counts this process's CPU time only, exact for one
thread). The numbers behind `yunque/quantize.py`'s choice.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from yunque.cpu.decode import PackedLinear
from yunque.quantize import QuantConfig, QuantLinear, quantize_weight, unpack_int4


def variants(w: torch.Tensor, dt: torch.dtype, batch: int) -> dict:
    N, K = w.shape
    x = torch.randn(batch, K, dtype=dt)
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data = w.to(dt)
    packed = PackedLinear(lin)
    q8 = quantize_weight(w, QuantConfig(bits=8))
    s8 = q8["weight_scale"].view(-1)
    q4 = quantize_weight(w, QuantConfig(bits=4, group_size=32))
    codes4 = unpack_int4(q4["qweight"])  # (N, K) uint8, 0..15
    s4 = q4["weight_scale"].float()  # (N, K/32)
    tiny = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4.to(torch.int32), 1)
    sz = {
        d: torch.stack([s4, torch.zeros_like(s4)], -1).transpose(0, 1).contiguous().to(d)  # symmetric: no offset
        for d in (dt, torch.bfloat16)
    }
    ql8 = QuantLinear.from_linear(lin.float(), QuantConfig(bits=8))
    ql4 = QuantLinear.from_linear(lin.float(), QuantConfig(bits=4, group_size=32))
    out = {
        f"{dt_name(dt)} oneDNN packed": lambda: packed(x),
        "int8 dequant+matmul": lambda: F.linear(x, q8["qweight"].to(dt) * s8.to(dt)[:, None]),
        f"int8 _weight_int8pack_mm, {dt_name(dt)} x": lambda: torch.ops.aten._weight_int8pack_mm(
            x, q8["qweight"], s8.to(dt)
        ),
        "int4 dequant+matmul": lambda: F.linear(
            x, ((codes4.view(N, -1, 32).to(dt) - 8) * s4.to(dt)[..., None]).view(N, K)
        ),
        f"int4 _weight_int4pack_mm_for_cpu, {dt_name(dt)} x": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, tiny, 32, sz[dt]
        ),
    }
    if dt != torch.bfloat16:
        if batch > 8:  # the scalar loop: minutes at prefill sizes, and never chosen
            for k in [k for k in out if k.endswith(f"{dt_name(dt)} x")]:
                del out[k]
        out["int8 _weight_int8pack_mm, x cast to bf16"] = lambda: torch.ops.aten._weight_int8pack_mm(
            x.to(torch.bfloat16), q8["qweight"], s8.to(torch.bfloat16)
        ).to(dt)
        out["int4 _weight_int4pack_mm_for_cpu, x cast to bf16"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), tiny, 32, sz[torch.bfloat16]
        ).to(dt)
    out["yunque QuantLinear int8"] = lambda: ql8(x)
    out["yunque QuantLinear int4 g32"] = lambda: ql4(x)
    return out


def dt_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dt]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, for 1 thread on a shared machine (other processes' time excluded)",
    )
    ap.add_argument(
        "--batches", type=int, nargs="+", default=[1, 8, 16, 32, 128], help="rows of x: decode batches, a prefill"
    )
    ap.add_argument("--shapes", default="576x1536,2048x8192", help="INxOUT, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {args.threads} threads, cpu capability {cap}, {args.clock} clock")
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        w = torch.randn(N, K) * 0.02
        for batch in args.batches:
            for dt in (torch.float32, torch.bfloat16):
                fns = variants(w, dt, batch)
                times: dict[str, list[float]] = {k: [] for k in fns}
                for fn in fns.values():
                    fn()
                clock = time.process_time if args.clock == "cpu" else time.perf_counter
                for _ in range(args.repeats):
                    for k, fn in fns.items():
                        t = clock()
                        for _ in range(5):
                            fn()
                        times[k].append((clock() - t) / 5)
                base = min(next(iter(times.values())))
                print(f"\n{K}x{N} batch {batch}, {dt_name(dt)} activations: fastest, median, speed-up of the fastest")
                for k, ts in times.items():
                    print(
                        f"  {k:50s} {min(ts) * 1e6:9.1f} us {statistics.median(ts) * 1e6:9.1f} us "
                        f"{base / min(ts):5.2f}x"
                    )


if __name__ == "__main__":
    main()
