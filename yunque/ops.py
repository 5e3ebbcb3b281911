"""RMSNorm and SwiGLU as autograd functions that save only their inputs, and a way to save
a cheap activation as the recipe that made it.

Written as plain tensor ops, autograd keeps every intermediate a later backward formula
reads: RMSNorm keeps its fp32 normalised activations next to its input, and SwiGLU keeps
silu(gate) next to gate and up. Both are one cheap elementwise pass to recompute, and at
seq 512 x 4 they were a quarter of the saved activations of a 125M model (measured with
saved-tensor hooks: 342 of 1406 MB in full fp32 training).

On CPUs where yunque's kernels build (cpu_kernels), both run as one fused pass forward and
one backward, with the same roundings (RMSNorm's sum of squares in another order, silu's exp
within ~1 ulp). Elsewhere the forwards are the same ops in the same order as Hugging Face's,
so outputs are bit-identical; SwiGLU's backward is autograd's own formula (silu_backward), and
RMSNorm's is the closed form of the gradient, in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from yunque.cpu import kernels as cpu_kernels


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    if out_dtype is not None and cpu_kernels.rms_norm_ok(x, weight):  # one pass; the cast made in it
        return cpu_kernels.rms_norm(x, weight, eps, out_dtype)
    # Normalise in fp32 and cast back before the weight, as HF does, so bf16 results match.
    h = x.float()
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    y = weight * (h * r).to(x.dtype)
    return (y if out_dtype is None else y.to(out_dtype)), r


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None) -> torch.Tensor:
        y, r = _rms_norm_forward(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        if cpu_kernels.rms_norm_ok(x, weight) and g.dtype in cpu_kernels.dtypes:
            gx, gw = cpu_kernels.rms_norm_backward(g, x, weight, r, ctx.needs_input_grad[1])
            return gx, gw, None, None
        g = g.to(torch.promote_types(g.dtype, x.dtype))  # the output's cast, undone as autograd would
        n = x.float() * r  # the normalised input, recomputed
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * n.to(x.dtype)).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gn = (g * weight).to(x.dtype).float()  # rounded where autograd would round it
            # d/dh of h * rsqrt(mean(h^2) + eps): r * (gn - n * mean(gn * n))
            gx = (r * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        return gx, gw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight * x / rms(x), normalised in fp32; `out_dtype` casts the result (autocast's dtype)."""
    if not (x.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        return _rms_norm_forward(x, weight, eps, out_dtype)[0]  # inference: no Function call, no saved tensors
    return _RMSNorm.apply(x, weight, eps, out_dtype)


def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if cpu_kernels.elementwise_ok(gate, up):  # one pass, no silu temporary
        return cpu_kernels.swiglu(gate, up)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gate, up = ctx.saved_tensors
        if cpu_kernels.elementwise_ok(g, gate, up):
            return cpu_kernels.swiglu_backward(g, gate, up, *ctx.needs_input_grad)
        g_gate = g_up = None
        if ctx.needs_input_grad[1]:
            g_up = g * F.silu(gate)
        if ctx.needs_input_grad[0]:
            g_gate = torch.ops.aten.silu_backward(g * up, gate)
        return g_gate, g_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    if not (gate.requires_grad or up.requires_grad) or not torch.is_grad_enabled():
        return _swiglu_forward(gate, up)
    return _SwiGLU.apply(gate, up)


def saved_as_recipe(t: torch.Tensor, make: Callable[[], torch.Tensor], enabled: bool = True) -> contextlib.AbstractContextManager:
    """Inside this block, autograd keeps `t` (and views of it) as `make` instead of its data.

    For activations that are one elementwise pass over tensors autograd saves anyway: the
    normed input of q/k/v and gate/up (made from the residual stream RMSNorm keeps) and the
    SwiGLU product down_proj reads (made from gate and up). `make` must rebuild `t` bit for
    bit; it runs in backward when the first consumer needs it, and its result is shared by
    the rest of the block's consumers, then freed with them.
    """
    if not (enabled and torch.is_grad_enabled() and t.requires_grad and t.numel() and t.is_contiguous() and t.storage_offset() == 0):
        return contextlib.nullcontext()  # the disabled case costs next to nothing: decode runs through here
    ptr, dtype = t.untyped_storage().data_ptr(), t.dtype
    made: list[torch.Tensor] = []

    def pack(x: torch.Tensor):
        # Activations are plain tensors; subclasses (quantized weights, DTensors) may have no storage.
        if type(x) is torch.Tensor and x.dtype == dtype and x.untyped_storage().data_ptr() == ptr:
            return (x.shape, x.stride(), x.storage_offset())  # where in `t` it looked
        return _pack_cast(x) if _recast_params else x  # the inner hooks are the only ones autograd calls

    def unpack(x):
        if isinstance(x, (torch.Tensor, _ParamCast)):
            return _unpack_cast(x)
        if not made:
            with torch.no_grad():
                made.append(make())
        return made[0].as_strided(*x)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


# ---------------------------------------------------------------- autocast's weight copies


_VIEWS = frozenset({"TBackward0", "TransposeBackward0", "ViewBackward0", "PermuteBackward0", "UnsqueezeBackward0"})
_recast_params = False  # set inside params_recast_in_backward(); saved_as_recipe's hooks read it too


class _ParamCast:
    __slots__ = ("param", "dtype", "view")

    def __init__(self, param: torch.Tensor, x: torch.Tensor):
        self.param, self.dtype, self.view = param, x.dtype, (x.shape, x.stride(), x.storage_offset())


def _pack_cast(x):
    """`x` as a recipe if it is (a view of) a dtype cast of a leaf parameter, else `x`."""
    if type(x) is not torch.Tensor or x.grad_fn is None:
        return x
    fn = x.grad_fn
    while fn is not None and fn.name() in _VIEWS:
        fn = fn.next_functions[0][0]
    if fn is None or fn.name() != "ToCopyBackward0":
        return x
    p = getattr(fn.next_functions[0][0], "variable", None)  # the AccumulateGrad node's parameter
    if (p is None or type(p.data) is not torch.Tensor or p.dtype == x.dtype or not p.is_contiguous()
            or x.untyped_storage().nbytes() != p.numel() * x.element_size()):
        return x
    return _ParamCast(p, x)


def _unpack_cast(x):
    if isinstance(x, _ParamCast):
        with torch.no_grad():
            return x.param.to(x.dtype).as_strided(*x.view)
    return x


@contextlib.contextmanager
def params_recast_in_backward(enabled: bool = True):
    """Inside this block, autograd keeps low-precision copies of parameters as the cast that made them.

    Under bf16 autocast each linear runs on a bf16 copy of its fp32 weight, and autograd keeps
    that copy until backward reads it: a second, half-size copy of the weights alive at the
    step's peak (151 MB for a 125M model). Re-casting it in backward costs one pass over the
    weights (~1% of a step). The copies are freed only if autocast does not cache them too
    (`cache_enabled=False`, or backward after the autocast block exits). Parameters must not
    change between forward and backward.
    """
    global _recast_params
    if not (enabled and torch.is_grad_enabled()):
        yield
        return
    prev, _recast_params = _recast_params, True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack_cast, _unpack_cast):
            yield
    finally:
        _recast_params = prev
