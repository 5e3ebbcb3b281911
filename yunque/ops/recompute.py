"""Activations and weight copies that autograd keeps as the recipe that made them, not as data.

`saved_as_recipe` stands for a cheap activation (a normed input, the SwiGLU product) that is one
elementwise pass over tensors autograd saves anyway; `params_recast_in_backward` for autocast's
low-precision copies of the weights. Both trade a pass in backward for memory at the step's peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def saved_as_recipe(
    t: torch.Tensor, make: Callable[[], torch.Tensor], enabled: bool = True
) -> contextlib.AbstractContextManager:
    """Inside this block, autograd keeps `t` (and views of it) as `make` instead of its data.

    For activations that are one elementwise pass over tensors autograd saves anyway: the
    normed input of q/k/v and gate/up (made from the residual stream RMSNorm keeps) and the
    SwiGLU product down_proj reads (made from gate and up). `make` must rebuild `t` bit for
    bit; it runs in backward when the first consumer needs it, and its result is shared by
    the rest of the block's consumers, then freed with them.
    """
    if not (
        enabled
        and torch.is_grad_enabled()
        and t.requires_grad
        and t.numel()
        and t.is_contiguous()
        and t.storage_offset() == 0
    ):
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
    if (
        p is None
        or type(p.data) is not torch.Tensor
        or p.dtype == x.dtype
        or not p.is_contiguous()
        or x.untyped_storage().nbytes() != p.numel() * x.element_size()
    ):
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
    step's peak. Re-casting it in backward costs one pass over the weights (bench/NOTES.md,
    "Saved activations"). The copies are freed only if autocast does not cache them too
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
