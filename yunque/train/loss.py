"""The training loss: the output head and cross-entropy, chunk by chunk, never the whole (tokens, vocab) logits.

`linear_cross_entropy` runs the output projection chunk by chunk, only over trained positions,
and computes the gradients of each chunk while its logits are still there (as Liger's fused
linear cross-entropy does), so backward costs nothing extra and memory stays flat for a 128k
vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from yunque import ops
from yunque.model import Transformer


def _chunk_rows(vocab: int, itemsize: int) -> int:
    # About 32 MiB of logits, as 512 to 2048 rows (a multiple of 256), or 256 rows where 512 would
    # pass 64 MiB (a 128k vocabulary): fewer rows run the head's GEMMs below peak and re-read the
    # weight once more per chunk (bench/NOTES.md, "Head chunk size"). The cap is for memory: the
    # chunk is live at the step's peak, with every activation.
    if 512 * vocab * itemsize > 64 << 20:
        return 256
    return max(512, min(2048, (32 << 20) // (vocab * itemsize) // 256 * 256))


_ADD_SLICE = 1 << 20  # elements of wg added to gw at a time: a 4 MB fp32 temporary


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype, need_grad):
        n = h.shape[0]
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax in at least fp32
        loss = torch.zeros((), dtype=acc, device=h.device)
        gh = torch.empty_like(h) if need_grad and ctx.needs_input_grad[0] else None
        gw = (
            torch.zeros(weight.shape, dtype=acc, device=weight.device)
            if need_grad and ctx.needs_input_grad[1]
            else None
        )
        w = weight.to(compute_dtype)
        step = _chunk_rows(weight.shape[0], compute_dtype.itemsize)
        # The chunk's logits and the bf16 weight-gradient product get one buffer each for the whole
        # loop. Allocated per chunk, each freed (V, D) product left a hole the next chunk's logits
        # split, so the heap grew by one more buffer: the step's peak memory is here.
        logits = torch.empty(min(step, n), weight.shape[0], dtype=compute_dtype, device=h.device)
        wg = (
            torch.empty(weight.shape, dtype=compute_dtype, device=h.device)
            if gw is not None and gw.dtype != compute_dtype
            else None
        )
        wg_rows = max(1, _ADD_SLICE // weight.shape[1])
        grad = gh is not None or gw is not None
        for s in range(0, n, step):
            hc, yc = h[s : s + step].to(compute_dtype), targets[s : s + step]
            z = torch.mm(hc, w.t(), out=logits[: len(hc)])  # (c, V)
            chunk_loss, g = ops.cross_entropy_(z, yc, grad)  # g: d CE / d logits (c, V), maybe in z's memory
            loss += chunk_loss
            if not grad:
                continue
            if gh is not None:
                if gh.dtype == g.dtype:
                    torch.mm(g, w, out=gh[s : s + step])
                else:
                    gh[s : s + step] = g @ w
            if gw is not None:
                if wg is None:  # accumulated inside the GEMM
                    gw.addmm_(g.t(), hc)
                else:  # a bf16 product into fp32: add_ would cast all of it to a (V, D) fp32 temporary first
                    torch.mm(g.t(), hc, out=wg)
                    for r in range(0, len(wg), wg_rows):
                        gw[r : r + wg_rows].add_(wg[r : r + wg_rows])
        ctx.save_for_backward(gh, gw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        # Scaled in place: a second (V, D) buffer at the start of backward, when every activation
        # is still alive, would raise the step's peak. So the graph can be walked only once.
        if getattr(ctx, "spent", False):
            raise RuntimeError("linear_cross_entropy: backward ran twice on one graph (retain_graph is not supported)")
        ctx.spent = True
        gh, gw = ctx.saved_tensors
        dh = gh.mul_(grad_out.to(gh.dtype)) if gh is not None else None
        dw = gw.mul_(grad_out).to(ctx.weight_dtype) if gw is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `h (N, D) @ weight (V, D)^T` against `targets (N,)`, in fp32."""
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, dtype, need)


class CausalLMLoss(nn.Module):
    """Model + loss in one forward, so DDP / FSDP hooks see the output projection's use too."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, mask, target_idx, targets) -> torch.Tensor:
        h = self.model.hidden(input_ids, positions, mask)
        h = h.reshape(-1, h.shape[-1]).index_select(0, target_idx)  # only trained positions reach the head
        head = self.model.lm_head
        if type(head) is nn.Linear:
            return linear_cross_entropy(h, head.weight, targets)
        return F.cross_entropy(head(h).float(), targets, reduction="sum")  # a wrapped head (LoRA on lm_head)
