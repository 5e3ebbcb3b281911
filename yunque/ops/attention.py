"""Attention for the model: RoPE, the KV cache write, and the fastest of four ways to attend.

`attention` picks, in order: yunque's CPU kernel (yunque/cpu/, which also applies RoPE when it can),
per-document attention for packed rows (`Segments`), a single-query path for CPU decode, and PyTorch's
SDPA. Every path computes the same causal attention; the reasons for each are in bench/NOTES.md.

Shapes: B batch, T query length, S key length (cache size), H query heads, K key/value heads, hd head dim.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from yunque.ops import seam


@dataclass(frozen=True)
class Segments:
    """Packed rows as runs of documents: `lengths` tile the flattened (B*T) tokens, row by row.

    Passed where a mask goes. Attention then runs causally within each segment, so its cost
    is sum(L_i^2) instead of B*T^2 and no (B, 1, T, T) mask is built or read: for SFT rows
    of ~60-token examples packed into 512, that is several times less attention work.
    """

    lengths: tuple[int, ...]
    _starts: dict = field(default_factory=dict, compare=False, repr=False)  # row_starts, made once per batch

    def row_starts(self, B: int, T: int) -> torch.Tensor:
        """(B, T) int32: the position in its row where each token's segment begins."""
        if (B, T) not in self._starts:  # every layer asks for the same one
            L = torch.tensor(self.lengths)
            first = torch.repeat_interleave(torch.cumsum(L, 0) - L, L).view(B, T)  # flat index of the segment start
            self._starts[B, T] = (first - torch.arange(B)[:, None] * T).to(torch.int32)
        return self._starts[B, T]

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> Segments:
        d = doc_ids.cpu()
        starts = torch.ones(d.shape, dtype=torch.bool)  # a row always starts a segment
        starts[:, 1:] = d[:, 1:] != d[:, :-1]
        idx = starts.reshape(-1).nonzero().squeeze(1).tolist() + [d.numel()]
        return cls(tuple(b - a for a, b in zip(idx, idx[1:])))


class Cache(Protocol):
    """A KV cache: writes k/v (B, K, T, hd) at `slots` and returns the whole cache (B, K, S, hd) each."""

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's rotate-half layout, with the sign folded into the first half of `sin_signed`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | Segments | None = None,
    cache: Cache | None = None,
    slots: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of q (B, H, T, hd) over k, v (B, K, T, hd), q and k before RoPE -> (B, T, H*hd).

    1. RoPE on q and k: `rope` is the cos and signed sin tables (B, 1, T, hd) of the positions;
    2. with a `cache`, k and v are written at its `slots` and the queries attend over all of it;
    3. attention, the first of these that takes the inputs:
       - yunque's CPU kernel, without a cache (training, scoring), which does step 1 itself when it can;
       - per-document attention when `mask` is `Segments` (packed rows);
       - for one query per row in bf16 on the CPU (decode), two plain matmuls;
       - PyTorch's SDPA, causal (mask None) or under `mask` (B, 1, T, S) bool, True where a query may attend.
    `window` (Mistral's sliding window: a query sees at most this many keys, itself included) is applied
    with `Segments` and by the kernel; a bool mask carries it itself, and mask None means plain causal.
    """
    B, H, T, hd = q.shape
    cos, sin = rope
    kernel = (
        cache is None
        and (mask is None or isinstance(mask, Segments))
        and q.device.type == "cpu"
        and seam.kernels is not None
    )
    if kernel:
        seg = mask.row_starts(B, T) if isinstance(mask, Segments) else None
        dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        y = seam.kernels.attention(q, k, v, seg_start=seg, window=window, rope=(cos[:, 0], sin[:, 0]), dtype=dt)
        if y is not None:
            return y.view(B, T, H * hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kernel:
        # RoPE ran in fp32; the kernel casts to autocast's dtype as SDPA's autocast would
        y = seam.kernels.attention(q, k, v, seg_start=seg, window=window, dtype=dt)
        if y is not None:
            return y.view(B, T, H * hd)
    if cache is not None:
        k, v = cache.update(slots, k, v)  # (B, K, S, hd)
    # Grouped-query attention: each kv head serves H/K query heads, without copying the cache H/K times.
    gqa = k.shape[1] != H
    if isinstance(mask, Segments):
        return segment_attention(q, k, v, mask.lengths, window, gqa)
    if T == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
        y = decode_attention(q, k, v, mask)
    elif mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2).reshape(B, T, H * hd)


def segment_attention(q, k, v, lengths: tuple[int, ...], window: int | None, gqa: bool) -> torch.Tensor:
    """Causal attention within each segment. q (B, H, T, hd), k/v (B, K, T, hd) -> (B, T, H*hd)."""
    B, H, T, hd = q.shape
    # On CPU, PyTorch's flash kernel is faster in fp32 than in bf16 on short segments (bench/NOTES.md,
    # "Segment attention"), so there segments are attended in fp32, with autocast off (it would cast
    # them back to bf16), and the output is rounded once. GPUs keep low precision (flash kernels).
    cpu = q.device.type == "cpu"
    # Token-major (B*T, n, hd): split along tokens (its backward is one cat, unlike slicing's
    # zero-filled copies), and the output comes out in the layout o_proj reads.
    qs, ks, vs = (
        t.transpose(1, 2)
        .to(torch.promote_types(t.dtype, torch.float32) if cpu else t.dtype, memory_format=torch.contiguous_format)
        .reshape(B * T, t.shape[1], hd)
        .split(lengths)
        for t in (q, k, v)
    )
    out = []
    with torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext():
        for qi, ki, vi in zip(qs, ks, vs):
            L = qi.shape[0]
            # (1, n, L, hd): the CPU flash kernel takes only 4-D inputs (3-D falls back to the math path).
            qi, ki, vi = (t.transpose(0, 1)[None] for t in (qi, ki, vi))
            if window is not None and L > window:
                pos = torch.arange(L, device=q.device)
                band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
                y = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=band, enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
            out.append(y[0].transpose(0, 1))  # (L, H, hd)
    y = torch.cat(out)
    return (y.to(q.dtype) if cpu else y).view(B, T, H * hd)


def decode_attention(q, k, v, mask) -> torch.Tensor:
    """One query per row, as plain matmuls: q (B, H, 1, hd), k/v (B, K, S, hd) -> (B, H, 1, hd).

    On CPU, PyTorch's flash kernel takes several times longer for a single bf16 query (bench/NOTES.md,
    "Decode attention"). The numerics are Hugging Face's eager attention: scores in the input dtype,
    softmax in fp32. Query heads sharing a kv head are stacked as rows, so GQA reads the cache once.
    The whole static cache is read, masked: the bf16 batched GEMM copies a strided operand first, so
    slicing it to the filled slots was slower.
    """
    B, H, _, hd = q.shape
    K = k.shape[1]
    scores = torch.matmul(q.view(B, K, H // K, hd), k.transpose(-1, -2)) * hd**-0.5  # (B, K, H/K, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S) broadcasts over heads
    p = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(p, v).view(B, H, 1, hd)
