"""CPU weight layouts for decode: linears re-laid out for oneDNN's GEMM kernels."""

from __future__ import annotations

import torch

from yunque import cpu


class PackedLinear(torch.nn.Module):
    """An inference-only `nn.Linear` whose weight oneDNN has re-laid out for its own GEMM kernels.

    Decode is a chain of GEMVs streaming every weight from memory once per token; oneDNN on a
    pre-packed weight streams it faster than MKL on a plain one, and on more cores (bench/NOTES.md,
    "Decode layout"). The packed weight has no autograd and an opaque layout, so this is the last
    step before inference; `state_dict()` still gives the plain weight, so such a model saves like
    any other.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Not a buffer: `.to()` cannot convert the opaque layout, and must not try.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), 1)
        self.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # the op has no backward: gradients would silently be missing
            raise RuntimeError("PackedLinear is inference-only; train on a model from formats.hf.load_model")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.packed.to_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _can_pack(w: torch.Tensor) -> bool:
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.no_grad()
def arrange_for_decode_(model: torch.nn.Module, pack: bool = True) -> int:
    """Lay out each CPU linear weight for fast decode, same values; returns how many changed.

    With oneDNN (every x86 and Arm build of torch), linears become `PackedLinear`. A weight
    shared with the embedding (a tied head) stays a plain tensor, since the lookup needs it.
    Otherwise, and with `pack=False`: fp32 weights are stored column-major, where F.linear's x @ W.T
    is a plain row-major GEMM that MKL streams faster than its GEMV on the (out, in) row-major weight
    (bench/NOTES.md, "Decode layout"); bf16 stays row-major. Nothing changes when
    `yunque.cpu.enabled()` is False.
    """
    if not cpu.enabled():
        return 0
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    changed = 0
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if type(m) is not torch.nn.Linear or m.weight.device.type != "cpu":
                continue
            w = m.weight.data
            if pack and id(m.weight) not in shared and _can_pack(w):
                setattr(parent, name, PackedLinear(m))
            elif w.dtype == torch.float32 and not w.t().is_contiguous():
                m.weight.data = w.t().contiguous().t()
            elif w.dtype != torch.float32 and not w.is_contiguous():
                m.weight.data = w.contiguous()
            else:
                continue
            changed += 1
    return changed
