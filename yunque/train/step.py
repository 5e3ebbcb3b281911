"""The pieces of the training loop: optimizer groups, schedule, one step, evaluation.

Loss normalisation: a step's loss is the sum of per-token losses over *every* micro-batch
of the accumulation step (and every rank), divided by the number of trained tokens in all
of them. Averaging each micro-batch's mean instead weights a token by 1/len(its batch) and
makes accumulation differ from a big batch when micro-batches hold different numbers of
trained tokens, which is the rule rather than the exception with masked SFT data.

The loss itself (the head and cross-entropy, chunked) is in `loss.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from yunque.ops import Segments, params_recast_in_backward
from yunque.train.packing import IGNORE, Batch

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


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, fused: bool | None = None
) -> torch.optim.AdamW:
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
    return DeviceBatch(
        ids,
        b.positions.to(device, non_blocking=nb),
        mask,
        idx.to(device, non_blocking=nb),
        flat[idx].to(device, non_blocking=nb),
    )


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast; `cache=False`: no cache of weight copies (each linear casts its own, once)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro: list[DeviceBatch],
    n_targets: int,
    *,
    world: int,
    precision: str,
    grad_clip: float,
    no_sync: Callable[[bool], contextlib.AbstractContextManager],
    params: Iterable[torch.Tensor],
    recast_weights: bool = True,
    check: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over the micro-batches of this rank.

    `n_targets` is the trained-token count of the whole step on all ranks; each rank's sum is
    scaled by world / n_targets because DDP/FSDP average gradients over ranks. Returns this
    rank's summed loss (a device tensor: no host sync) and the pre-clip gradient norm.
    `recast_weights`: under bf16, keep no bf16 weight copies for backward (ops.params_recast_in_backward);
    off under FSDP, whose gathered weights are freed after forward.
    `check(loss, grad_norm)` runs before the update (the norm is computed for it when there is
    no clipping); False drops the gradients instead of applying them (a NaN or Inf step).
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
    params = list(params)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else None
    if check is not None and norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if check is None or check(total, norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


@torch.no_grad()
def evaluate(
    module: nn.Module, batches: list[DeviceBatch], byte_len: torch.Tensor | None, precision: str
) -> torch.Tensor:
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
