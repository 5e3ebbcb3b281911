"""RMSNorm and SwiGLU as autograd functions that save only their inputs, and the head's cross-entropy.

Written as plain tensor ops, autograd keeps every intermediate a later backward formula reads:
RMSNorm keeps its fp32 normalised activations next to its input, and SwiGLU keeps silu(gate) next
to gate and up. Both are one cheap elementwise pass to recompute, and together a quarter of a
model's saved activations (bench/NOTES.md, "Saved activations").

Where yunque's CPU kernels run (yunque/cpu/), each op is one fused pass forward and one backward,
with the same roundings (RMSNorm's sum of squares in another order, silu's exp within ~1 ulp).
Elsewhere the forwards are the same ops in the same order as Hugging Face's, so outputs are
bit-identical; SwiGLU's backward is autograd's own formula (silu_backward), and RMSNorm's is the
closed form of the gradient, in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from yunque.ops import seam


def _rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
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
    if seam.kernels is not None and (y := seam.kernels.rms_norm(x, weight, eps, out_dtype)) is not None:
        return y
    if not (x.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        return _rms_norm_forward(x, weight, eps, out_dtype)[0]  # inference: no Function call, no saved tensors
    return _RMSNorm.apply(x, weight, eps, out_dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gate, up = ctx.saved_tensors
        g_gate = g_up = None
        if ctx.needs_input_grad[1]:
            g_up = g * F.silu(gate)
        if ctx.needs_input_grad[0]:
            g_gate = torch.ops.aten.silu_backward(g * up, gate)
        return g_gate, g_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    if seam.kernels is not None and (y := seam.kernels.swiglu(gate, up)) is not None:
        return y
    if not (gate.requires_grad or up.requires_grad) or not torch.is_grad_enabled():
        return F.silu(gate) * up
    return _SwiGLU.apply(gate, up)


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of `logits` (N, V) against `targets` (N,) in at least fp32, and with `grad`
    d CE / d logits = softmax - onehot in the logits' dtype (possibly written over `logits`), else None."""
    if seam.kernels is not None and (rows := seam.kernels.xent_(logits, targets, grad)) is not None:
        return rows.sum(), (logits if grad else None)  # one read of the logits, the gradient written over them
    # log_softmax is one fused pass per row; logsumexp would allocate two (N, V) temporaries.
    acc = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits, dim=-1, dtype=acc)  # (N, V)
    at_target = logp.gather(1, targets[:, None]).squeeze(1)  # log p(y)
    if not grad:
        return -at_target.sum(), None
    # Rounded once to the logits' dtype: exp writes straight into it, and the target entries are redone from fp32.
    rows = torch.arange(len(targets), device=logits.device)
    g = logp.exp_() if logits.dtype == acc else torch.exp(logp, out=torch.empty_like(logp, dtype=logits.dtype))
    g[rows, targets] = (at_target.exp() - 1.0).to(logits.dtype)
    return -at_target.sum(), g
