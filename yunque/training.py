"""The pieces of the training loop: optimizer groups, schedule, loss, one step, evaluation.

Loss normalisation: a step's loss is the sum of per-token losses over *every* micro-batch
of the accumulation step (and every rank), divided by the number of trained tokens in all
of them. Averaging each micro-batch's mean instead weights a token by 1/len(its batch) and
makes accumulation differ from a big batch when micro-batches hold different numbers of
trained tokens, which is the rule rather than the exception with masked SFT data.

The loss never materialises the (tokens, vocab) logits: `linear_cross_entropy` runs the
output projection chunk by chunk, only over trained positions, and computes the gradients
of each chunk while its logits are still there (as Liger's fused linear cross-entropy
does), so backward costs nothing extra and memory stays flat for a 128k vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from yunque import cpu_kernels
from yunque.model import Segments, Transformer
from yunque.ops import params_recast_in_backward
from yunque.packing import IGNORE, Batch

# ---------------------------------------------------------------- CPU allocator


def tune_cpu_memory() -> bool:
    """Keep a CPU training step's memory from fragmenting or being handed back each step.

    Every step frees and re-allocates the same large activation and gradient buffers. Tensors
    >= 256 KiB go to yunque's arena (cpu_arena: best fit in a range of their own, pages kept),
    which holds peak RSS to within ~10% of peak live tensor memory; on glibc's heap it was
    1.3-1.4x (torch's 64-byte-aligned blocks fragment it, glibc bug 14581). For what stays on
    glibc (small blocks, or all of it without the arena) mmap allocation and trimming are off:
    by default glibc serves blocks >= 128 KiB-32 MiB with fresh mmap()s and trims the heap on
    free, so each step page-faulted its working set back in (130k faults per base-preset step).
    Returns whether the arena is installed.
    """
    import ctypes
    import ctypes.util
    import platform

    from yunque import cpu_arena

    arena = cpu_arena.install()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
            libc.mallopt(M_MMAP_MAX, 0)
        except (OSError, AttributeError):
            pass
    return arena


# ---------------------------------------------------------------- optimizer and schedule


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices; never norms, biases or embeddings (decaying those only hurts)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                   fused: bool | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    if fused is None:  # fused needs plain tensors on a supported device; DTensors (FSDP) take foreach
        ps = [p for g in groups for p in g["params"]]
        fused = all(type(p.data) is torch.Tensor and p.is_floating_point() for p in ps)
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def lr_at(step: int, *, lr: float, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine / linear decay to `min_ratio * lr`, or constant."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return lr * (min_ratio + (1 - min_ratio) * shape)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# ---------------------------------------------------------------- loss


def _chunk_rows(vocab: int, itemsize: int) -> int:
    # About 32 MiB of logits, as 512 to 2048 rows (a multiple of 256), or 256 rows where 512 would
    # pass 64 MiB (a 128k vocabulary). Fewer rows run the head's GEMMs below peak and re-read the
    # weight once more per chunk. Measured (fp32 forward GEMM, D 512/768, V 32k): 125-147 GF/s at
    # 256 rows against 166-175 at 512; and the whole head at V 4k-8k, D 256, fp32: 10% faster
    # with 2048 rows than with 512. At 32k, more than 512 gains nothing; 524 rather than 512 rows
    # ran the bf16 GEMMs 7-10% slower. At 128k, 65-row chunks took 1.5x as long as 256-row ones.
    # The cap is for memory: the chunk is live at the step's peak, with every activation.
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
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad and ctx.needs_input_grad[1] else None
        w = weight.to(compute_dtype)
        step = _chunk_rows(weight.shape[0], compute_dtype.itemsize)
        fused = compute_dtype in cpu_kernels.dtypes and h.device.type == "cpu" and cpu_kernels.available()
        # The chunk's logits and the bf16 weight-gradient product get one buffer each for the whole
        # loop. Allocated per chunk, each freed (V, D) product left a hole the next chunk's logits
        # split, so the heap grew by one more buffer: the step's peak memory is here.
        logits = torch.empty(min(step, n), weight.shape[0], dtype=compute_dtype, device=h.device)
        wg = torch.empty(weight.shape, dtype=compute_dtype, device=h.device) if gw is not None and gw.dtype != compute_dtype else None
        wg_rows = max(1, _ADD_SLICE // weight.shape[1])
        grad = gh is not None or gw is not None
        for s in range(0, n, step):
            hc, yc = h[s:s + step].to(compute_dtype), targets[s:s + step]
            z = torch.mm(hc, w.t(), out=logits[:len(hc)])  # (c, V)
            if fused:  # the same math in one read of the logits and two of L2, gradient written over them
                g = z
                loss += cpu_kernels.xent_(g, yc, grad=grad).sum()
            else:
                # log_softmax is one fused pass per row; logsumexp would allocate two (c, V) temporaries.
                logp = torch.log_softmax(z, dim=-1, dtype=acc)  # (c, V)
                at_target = logp.gather(1, yc[:, None]).squeeze(1)  # log p(y)
                loss -= at_target.sum()
                if grad:
                    # d CE / d logits = softmax - onehot, rounded once to the compute dtype: exp writes
                    # straight into it, and the target entries are redone from fp32.
                    rows = torch.arange(len(yc), device=h.device)
                    g = logp.exp_() if compute_dtype == acc else torch.exp(logp, out=torch.empty_like(logp, dtype=compute_dtype))
                    g[rows, yc] = (at_target.exp() - 1.0).to(compute_dtype)
            if not grad:
                continue
            if gh is not None:
                if gh.dtype == g.dtype:
                    torch.mm(g, w, out=gh[s:s + step])
                else:
                    gh[s:s + step] = g @ w
            if gw is not None:
                if wg is None:  # accumulated inside the GEMM
                    gw.addmm_(g.t(), hc)
                else:  # a bf16 product into fp32: add_ would cast all of it to a (V, D) fp32 temporary first
                    torch.mm(g.t(), hc, out=wg)
                    for r in range(0, len(wg), wg_rows):
                        gw[r:r + wg_rows].add_(wg[r:r + wg_rows])
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


@dataclass
class DeviceBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    mask: Segments | None  # None: every row is one causal document
    target_idx: torch.Tensor
    targets: torch.Tensor


def to_device(b: Batch, device: torch.device) -> DeviceBatch:
    """Move a packed batch; target indices are found on the host so the device never syncs on them."""
    flat = b.labels.reshape(-1)
    idx = (flat != IGNORE).nonzero().squeeze(1)
    nb = device.type == "cuda"
    ids = b.input_ids.to(device, non_blocking=nb)
    mask = None if b.single_doc else Segments.from_doc_ids(b.doc_ids)
    return DeviceBatch(ids, b.positions.to(device, non_blocking=nb), mask,
                       idx.to(device, non_blocking=nb), flat[idx].to(device, non_blocking=nb))


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast; `cache=False`: no cache of weight copies (each linear casts its own, once)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, micro: list[DeviceBatch], n_targets: int,
               *, world: int, precision: str, grad_clip: float, no_sync: Callable[[bool], contextlib.AbstractContextManager],
               params: Iterable[torch.Tensor], recast_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over the micro-batches of this rank.

    `n_targets` is the trained-token count of the whole step on all ranks; each rank's sum is
    scaled by world / n_targets because DDP/FSDP average gradients over ranks. Returns this
    rank's summed loss (a device tensor: no host sync) and the pre-clip gradient norm.
    `recast_weights`: under bf16, keep no bf16 weight copies for backward (ops.params_recast_in_backward);
    off under FSDP, whose gathered weights are freed after forward.
    """
    device = micro[0].input_ids.device
    scale = world / max(1, n_targets)
    total = torch.zeros((), dtype=torch.float32, device=device)
    # Without autocast's cache, and with the copies saved as their casts, no bf16 copy of the
    # weights outlives the linear that used it.
    recast = precision == "bf16" and recast_weights
    for i, mb in enumerate(micro):
        with no_sync(i < len(micro) - 1):
            with autocast(device, precision, cache=not recast), params_recast_in_backward(recast):
                loss = module(mb.input_ids, mb.positions, mb.mask, mb.target_idx, mb.targets)
            (loss * scale).backward()
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(list(params), grad_clip) if grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


@torch.no_grad()
def evaluate(module: nn.Module, batches: list[DeviceBatch], byte_len: torch.Tensor | None, precision: str) -> torch.Tensor:
    """(summed nats, trained tokens, target bytes) over `batches`, as one device tensor (for all-reduce)."""
    was = module.training
    module.eval()
    acc = None
    for b in batches:
        with autocast(b.input_ids.device, precision):
            nats = module(b.input_ids, b.positions, b.mask, b.target_idx, b.targets)
        nbytes = byte_len[b.targets].sum() if byte_len is not None else torch.zeros((), device=nats.device)
        row = torch.stack([nats.float(), torch.tensor(float(len(b.targets)), device=nats.device), nbytes.float()])
        acc = row if acc is None else acc + row
    module.train(was)
    return acc if acc is not None else torch.zeros(3)


def eval_metrics(sums: torch.Tensor) -> dict[str, float]:
    nats, n, nbytes = (float(x) for x in sums.double().cpu())
    loss = nats / max(n, 1.0)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(n)}
    if nbytes > 0:
        out["val_bpb"] = nats / math.log(2) / nbytes
    return out
