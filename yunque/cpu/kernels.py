"""yunque's C++ training kernels (csrc/*.cpp) for x86 CPUs, built with g++ on first use.

Two builds of the same sources: with AVX-512 and AVX512-BF16 (bf16 and fp32) on CPUs that have
avx512_bf16, else with AVX2 and FMA (fp32 only) on CPUs that have those; `isa()` says which runs
(`YUNQUE_CPU_ISA=avx2` picks the AVX2 build on an AVX-512 CPU, for tests and measurements).

Each entry point (`attention`, `rms_norm`, `swiglu`, `xent_`) owns its autograd function and returns
None when it does not take its inputs (another device or dtype, a shape it has no kernel for, bf16
on the AVX2 build, a CPU with neither build, no g++, or `yunque.cpu.enabled()` False): callers try
it and keep PyTorch's ops otherwise. They exist because PyTorch's CPU ops ran these shapes far below
the machine's peak; the measurements are in bench/NOTES.md ("CPU kernels", "AVX2 build of the CPU
kernels").

The sources are compiled once per source, compiler and build into ~/.cache/yunque/kernels (or $YUNQUE_CACHE)
and loaded with ctypes: a plain C ABI, so no torch headers and a build of a few seconds.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from yunque import cpu
from yunque.cpu.build import compile_and_load, cpu_flags

_CSRC = Path(__file__).parent / "csrc"
_SRCS = [_CSRC / "attention_cpu.cpp", _CSRC / "xent_cpu.cpp", _CSRC / "fused_cpu.cpp"]
_HEADERS = [_CSRC / "simd.h"]
_COMMON = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-mfma"]
_FLAGS = {  # per build: (CPU flags it needs, compiler flags, cache stem)
    "avx512": (
        {"avx512_bf16"},
        [*_COMMON, "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16"],
        "cpu_kernels",
    ),
    "avx2": ({"avx2", "fma"}, [*_COMMON, "-mavx2", "-DYQ_AVX2"], "cpu_kernels_avx2"),
}
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


@functools.cache
def isa() -> str | None:
    """The build this CPU runs: "avx512" (bf16 and fp32), "avx2" (fp32), or None (neither)."""
    flags = cpu_flags()
    for name in ("avx2",) if cpu.forced_isa() == "avx2" else ("avx512", "avx2"):
        if _FLAGS[name][0] <= flags:
            return name
    return None


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The library `isa()` names, built; None on a CPU with neither build or when the build fails."""
    name = isa()
    if name is None:
        return None
    _, flags, stem = _FLAGS[name]
    # links libgomp.so.1 by soname: torch's, already loaded, so one thread pool
    lib = compile_and_load(stem, _SRCS + _HEADERS, flags, "CPU kernels", "using PyTorch's ops")
    if lib is None:
        return None
    lib.yq_lanes.argtypes, lib.yq_lanes.restype = [], _I
    qkv = [_P, _L, _L, _L] * 3
    for dt in ("bf16", "f32") if name == "avx512" else ("f32",):
        fwd, bwd = getattr(lib, f"yq_attn_fwd_{dt}"), getattr(lib, f"yq_attn_bwd_{dt}")
        fwd.argtypes = [*qkv, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _I]
        bwd.argtypes = [*qkv, _P, _P, _P, _P, _P, _P, _P, _P, _P, _L, _L, _I, _I, _I, _I, _I, _I, _F, _I]
        rope = getattr(lib, f"yq_rope_{dt}")
        rope.argtypes, rope.restype = [_P, _L, _L, _L, _P, _P, _L, _L, _P, _I, _I, _I, _I, _I], None
        fwd.restype = bwd.restype = None
        xent = getattr(lib, f"yq_xent_{dt}")
        xent.argtypes, xent.restype = [_P, _L, _P, _P, _I, _I, _I, _I], None
        sw_f, sw_b = getattr(lib, f"yq_swiglu_fwd_{dt}"), getattr(lib, f"yq_swiglu_bwd_{dt}")
        sw_f.argtypes, sw_f.restype = [_P, _P, _P, _L, _I], None
        sw_b.argtypes, sw_b.restype = [_P, _P, _P, _P, _P, _L, _I], None
        rms_f, rms_b = getattr(lib, f"yq_rms_fwd_{dt}"), getattr(lib, f"yq_rms_bwd_{dt}")
        rms_f.argtypes, rms_f.restype = [_P, _P, _P, _P, _L, _I, _F, _I], None
        rms_b.argtypes, rms_b.restype = [_P, _P, _P, _P, _P, _P, _L, _I, _I], None
    return lib


_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}  # the dtypes every kernel takes


def _runs(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether a kernel may run on `t` (as `dtype`): on the CPU, in a dtype the build has, switched on and built."""
    dtype = dtype or t.dtype
    return (
        t.device.type == "cpu"
        and dtype in _SUFFIX
        and cpu.enabled()
        and _lib() is not None
        and (dtype == torch.float32 or isa() == "avx512")
    )


def _fn(name: str, dtype: torch.dtype):
    return getattr(_lib(), f"yq_{name}_{_SUFFIX[dtype]}")


# ---------------------------------------------------------------- attention (with RoPE)


def _operand(t: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(B, n, T, hd) -> the tensor and its [ptr, stride_b, stride_t, stride_n] in elements."""
    # The kernel reads pairs of bf16 as 32-bit words: rows must start on even elements.
    if t.stride(-1) != 1 or any(s * t.element_size() % 4 for s in t.stride()[:3]) or t.data_ptr() % 4:
        t = t.transpose(1, 2).contiguous().transpose(1, 2)
    return t, [t.data_ptr(), t.stride(0), t.stride(2), t.stride(1)]


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """fp32 (B or 1, T, hd) tables with one layout -> them and their [ptr, ptr, stride_b, stride_t]."""
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, [cos.data_ptr(), sin.data_ptr(), cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1)]


def _rotated(x: torch.Tensor, tables: list) -> torch.Tensor:
    """RoPE of x (B, n, T, hd) into a dense (B, T, n, hd) tensor, seen as (B, n, T, hd)."""
    B, n, T, hd = x.shape
    out = torch.empty(B, T, n, hd, dtype=x.dtype)
    _fn("rope", x.dtype)(
        x.data_ptr(),
        x.stride(0),
        x.stride(2),
        x.stride(1),
        *tables,
        out.data_ptr(),
        B,
        T,
        n,
        hd,
        torch.get_num_threads(),
    )
    return out.transpose(1, 2)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, window: int, scale: float, cos, sin):
        B, H, T, hd = q.shape
        K = k.shape[1]
        tables = None
        if cos is not None:  # q and k arrive before RoPE: rotate them here, one pass each
            cos, sin, tables = _rope_tables(cos, sin)
            q, k = _rotated(q, tables), _rotated(k, tables)
        (q, qa), (k, ka), (v, va) = _operand(q), _operand(k), _operand(v)
        out = torch.empty(B, T, H, hd, dtype=q.dtype)
        lse = torch.empty(B, H, T, dtype=torch.float32)
        segp = seg.data_ptr() if seg is not None else None
        fwd = _fn("attn_fwd", q.dtype)
        fwd(*qa, *ka, *va, segp, out.data_ptr(), lse.data_ptr(), B, T, H, K, hd, window, scale, torch.get_num_threads())
        ctx.save_for_backward(q, k, v, out, lse, seg, cos, sin)
        ctx.window, ctx.scale = window, scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, seg, cos, sin = ctx.saved_tensors
        B, H, T, hd = q.shape
        K = k.shape[1]
        g = g.contiguous()
        dq = torch.empty(B, T, H, hd, dtype=q.dtype)
        dk = torch.empty(B, T, K, hd, dtype=q.dtype)
        dv = torch.empty(B, T, K, hd, dtype=q.dtype)
        (_, qa), (_, ka), (_, va) = _operand(q), _operand(k), _operand(v)
        tables = _rope_tables(cos, sin)[2] if cos is not None else [None, None, 0, 0]
        bwd = _fn("attn_bwd", q.dtype)
        bwd(
            *qa,
            *ka,
            *va,
            seg.data_ptr() if seg is not None else None,
            out.data_ptr(),
            g.data_ptr(),
            lse.data_ptr(),
            dq.data_ptr(),
            dk.data_ptr(),
            dv.data_ptr(),
            *tables,
            B,
            T,
            H,
            K,
            hd,
            ctx.window,
            ctx.scale,
            torch.get_num_threads(),
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None, None, None


def _rope_fusable(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """fp32 (B or 1, T, hd) tables, whole 16-lane halves, no table gradient."""
    return (
        cos.dtype == sin.dtype == torch.float32
        and q.shape[-1] % 32 == 0
        and cos.shape == sin.shape
        and cos.dim() == 3
        and cos.shape[1:] == (q.shape[2], q.shape[3])
        and cos.shape[0] in (1, q.shape[0])
        and not (cos.requires_grad or sin.requires_grad)
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    seg_start: torch.Tensor | None = None,
    window: int | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """Causal attention: q (B, H, T, hd), k/v (B, K, T, hd) -> (B, T, H, hd) in `dtype` (default q's), or None.

    Query i sees keys max(seg_start[b, i], i - window + 1) .. i; seg_start (B, T) int32 holds where
    each token's packed document begins in its row (None: row start). Without `rope`, q/k/v are cast
    to `dtype`. With `rope` (cos and signed sin, (B or 1, T, hd) fp32), q and k are taken before RoPE,
    in `dtype` already: they are rotated in fp32 and rounded once, and their gradients are taken back
    through it; None when the tables or head dim do not allow that (apply RoPE and call again).

    None also where the kernel does not run: head dim not a multiple of 16, or bf16 on a CPU with AMX
    tiles, where PyTorch's flash kernel runs its products on AMX, several times the bf16 rate of the
    vector units this kernel uses (AMX has no fp32 products, so fp32 stays here).
    """
    dtype = dtype or q.dtype
    if not (_runs(q, dtype) and q.shape[-1] % 16 == 0 and (dtype == torch.float32 or "amx_bf16" not in cpu_flags())):
        return None
    cos = sin = None
    if rope is not None:
        cos, sin = rope
        if not (q.dtype == k.dtype == v.dtype == dtype and _rope_fusable(q, cos, sin)):
            return None
    else:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if seg_start is not None:
        seg_start = seg_start.to(torch.int32).contiguous()
    return _Attention.apply(q, k, v, seg_start, window or 0, q.shape[-1] ** -0.5, cos, sin)


# ---------------------------------------------------------------- the head's cross-entropy


def xent_(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor | None:
    """Per-row cross-entropy (N,) fp32 of bf16 or fp32 `logits` (N, V) against `targets` (N,), or None.

    With `grad`, `logits` is overwritten by d CE / d logits = softmax - onehot, in its dtype.
    """
    if not (_runs(logits) and logits.dim() == 2 and logits.stride(1) == 1):
        return None
    targets = targets.to(torch.int64).contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    xent = _fn("xent", logits.dtype)
    xent(
        logits.data_ptr(),
        logits.stride(0),
        targets.data_ptr(),
        loss.data_ptr(),
        logits.shape[0],
        logits.shape[1],
        int(grad),
        torch.get_num_threads(),
    )
    return loss


# ---------------------------------------------------------------- SwiGLU


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _fn("swiglu_fwd", gate.dtype)(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
    return out


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _swiglu(gate, up)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad
        g, gate, up = g.contiguous(), gate.contiguous(), up.contiguous()
        dgate = torch.empty_like(gate) if need_gate else None
        dup = torch.empty_like(up) if need_up else None
        _fn("swiglu_bwd", gate.dtype)(
            g.data_ptr(),
            gate.data_ptr(),
            up.data_ptr(),
            dgate.data_ptr() if need_gate else None,
            dup.data_ptr() if need_up else None,
            gate.numel(),
            torch.get_num_threads(),
        )
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up in one pass, silu rounded to the dtype first as `F.silu(gate) * up` does; its gradients
    as autograd's formulas round them. None unless gate and up share a device, dtype and shape."""
    if not (_runs(gate) and up.device == gate.device and up.dtype == gate.dtype and up.shape == gate.shape):
        return None
    if (gate.requires_grad or up.requires_grad) and torch.is_grad_enabled():
        return _SwiGLU.apply(gate, up)
    return _swiglu(gate, up)


# ---------------------------------------------------------------- RMSNorm


def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    D = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype)
    r = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    _fn("rms_fwd", out_dtype)(
        x.data_ptr(),
        weight.contiguous().data_ptr(),
        y.data_ptr(),
        r.data_ptr(),
        x.numel() // D,
        D,
        eps,
        torch.get_num_threads(),
    )
    return y, r


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        y, r = _rms_norm(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        need_weight = ctx.needs_input_grad[1]
        g, x = g.contiguous(), x.contiguous()
        D = x.shape[-1]
        gx = torch.empty_like(x)
        gw = torch.empty(D, dtype=torch.float32) if need_weight else None
        _fn("rms_bwd", g.dtype)(
            g.data_ptr(),
            x.data_ptr(),
            weight.contiguous().data_ptr(),
            r.data_ptr(),
            gx.data_ptr(),
            gw.data_ptr() if need_weight else None,
            x.numel() // D,
            D,
            torch.get_num_threads(),
        )
        return gx, gw, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """weight * x * rsqrt(mean(x^2) + eps) of fp32 rows in `out_dtype` (default fp32), forward and backward
    one pass each (fp32 gradients). None unless x and weight are fp32 on the CPU."""
    out_dtype = out_dtype or x.dtype
    if not (
        x.dtype == weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.shape == x.shape[-1:]
        and _runs(x, out_dtype)
    ):
        return None
    if (x.requires_grad or weight.requires_grad) and torch.is_grad_enabled():
        return _RMSNorm.apply(x, weight, eps, out_dtype)
    return _rms_norm(x, weight, eps, out_dtype)[0]
