"""The Llama-family decoder, top to bottom.

Covers what Hugging Face calls LlamaForCausalLM (Llama 2, 3, 3.1 with llama3 RoPE scaling,
3.2 with tied embeddings), MistralForCausalLM (sliding window) and Qwen2ForCausalLM
(q/k/v bias). Module and parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj`)
and RoPE uses HF's rotate-half layout, so an HF state dict loads as is and LoRA targets are
the `nn.Linear` names users already know. This file imports only torch (and yunque.ops, yunque.cpu_kernels).

Shapes: B batch, T query length, S key length (cache size), D hidden, H query heads,
K key/value heads, hd head dim, V vocab.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from yunque.cpu import kernels as cpu_kernels
from yunque.ops import rms_norm, saved_as_recipe, swiglu


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always; Llama when attention_bias)
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias sets both; Qwen2 has none)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys (itself included)
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # HF config keys we keep verbatim on save

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (hd/2,) on the CPU, including llama3 / linear context scaling."""
    hd = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a signed sin, (B, 1, T, hd) each, in HF's rotate-half layout.

    HF rotates with cat(-x2, x1) * sin. With the sign folded into the first half of sin once
    per forward, each layer's rotation is a roll: one op per q and k instead of a neg and a cat.
    """
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2); fp32 so long positions stay exact
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1).to(dtype)[:, None], torch.cat((-sin, sin), -1).to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every consumer (q/k/v, gate/up, the head) would cast the output to the autocast dtype on
        # its own: five copies per layer, each saved for backward. Casting once gives them one.
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return rms_norm(x, self.weight, self.eps, dt)  # in fp32, cast back before the weight, as HF does


class KVCache(nn.Module):
    """Static per-layer cache: fixed shape, written in place, so decode allocates nothing."""

    def __init__(self, batch: int, n_kv: int, max_len: int, hd: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, slots, k)  # k: (B, K, T, hd) into slots (T,)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


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


def segment_attention(q, k, v, lengths: tuple[int, ...], window: int | None, gqa: bool) -> torch.Tensor:
    """Causal attention within each segment. q (B, H, T, hd), k/v (B, K, T, hd) -> (B, T, H*hd)."""
    B, H, T, hd = q.shape
    # On CPU the flash kernel is ~1.7x faster (fwd+bwd) in fp32 than in bf16 on segments of 32-128
    # tokens (equal at 512), so there segments are attended in fp32, with autocast off (it would cast
    # them back to bf16), and the output is rounded once. GPUs keep low precision (flash kernels).
    cpu = q.device.type == "cpu"
    # Token-major (B*T, n, hd): split along tokens (its backward is one cat, unlike slicing's
    # zero-filled copies), and the output comes out in the layout o_proj reads.
    qs, ks, vs = (t.transpose(1, 2).to(torch.promote_types(t.dtype, torch.float32) if cpu else t.dtype,
                                       memory_format=torch.contiguous_format).reshape(B * T, t.shape[1], hd)
                  .split(lengths) for t in (q, k, v))
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

    On CPU the flash kernel takes 4-8x longer than this for a single bf16 query (0.2 ms against
    1.4-2.1 ms per layer at batch 8). The numerics are Hugging Face's eager attention: scores
    in the input dtype, softmax in fp32. Query heads sharing a kv head are stacked as rows, so
    GQA reads the cache once. The whole static cache is read, masked: the bf16 batched GEMM
    copies a strided operand first, so slicing it to the filled slots was slower (505 against
    575-660 tok/s at batch 8).
    """
    B, H, _, hd = q.shape
    K = k.shape[1]
    scores = torch.matmul(q.view(B, K, H // K, hd), k.transpose(-1, -2)) * hd**-0.5  # (B, K, H/K, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S) broadcasts over heads
    p = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(p, v).view(B, H, 1, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd
        self.window = cfg.sliding_window
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=cfg.attention_out_bias)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, slots):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, K, T, hd)
        if self.cache is None and (mask is None or isinstance(mask, Segments)) and q.device.type == "cpu":
            dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
            if cpu_kernels.usable(q, dt):
                seg = mask.row_starts(B, T) if isinstance(mask, Segments) else None
                cos0, sin0 = cos[:, 0], sin[:, 0]  # (B, T, hd)
                if q.dtype == k.dtype == v.dtype == dt and cpu_kernels.rope_fusable(q, cos0, sin0):
                    y = cpu_kernels.attention(q, k, v, seg, self.window, cos0, sin0)  # RoPE inside
                else:
                    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                    # RoPE ran in fp32; autocast casts SDPA's inputs the same way
                    y = cpu_kernels.attention(q.to(dt), k.to(dt), v.to(dt), seg, self.window)  # (B, T, H, hd)
                return self.o_proj(y.view(B, T, self.n_heads * self.hd))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(slots, k, v)  # (B, K, S, hd)
        # Grouped-query attention: each kv head serves H/K query heads, without copying the cache H/K times.
        gqa = self.n_kv != self.n_heads
        if isinstance(mask, Segments):
            return self.o_proj(segment_attention(q, k, v, mask.lengths, self.window, gqa))
        if T == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
            y = decode_attention(q, k, v, mask)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # mask: (B, 1, T, S)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x, recipes: bool = False):
        gate, up = self.gate_proj(x), self.up_proj(x)
        h = swiglu(gate, up)
        with saved_as_recipe(h, lambda: swiglu(gate, up), recipes):
            return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, slots, recipes: bool = False):
        """recipes: keep the normed inputs and the SwiGLU product for backward as recipes, not data.

        Each is one elementwise pass over tensors autograd saves anyway (the residual stream,
        gate and up), and together they were a third of a 125M model's saved activations.
        Off under activation checkpointing, whose own saved-tensor hooks must see everything.
        """
        # The recipes must not hold the tensors they stand for, and must cast as forward did
        # (autocast may be off by backward).
        h1 = self.input_layernorm(x)
        dt = h1.dtype
        with saved_as_recipe(h1, lambda: self.input_layernorm(x).to(dt), recipes):
            x2 = x + self.self_attn(h1, cos, sin, mask, slots)
        h2 = self.post_attention_layernorm(x2)
        with saved_as_recipe(h2, lambda: self.post_attention_layernorm(x2).to(dt), recipes):
            return x2 + self.mlp(h2, recipes)


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # nn.Embedding's own init is normal_(), which on the meta device (how checkpoints are loaded)
        # runs a Python decomposition that imports torch._dynamo and sympy: 70 MB of RSS and ~1 s.
        w = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if w.device.type != "meta":
            nn.init.normal_(w)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=w)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Made on the CPU even under `torch.device("meta")`: meta arange is a Python decomposition (see Backbone).
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(torch.get_default_device()), persistent=False)
        self.gradient_checkpointing = False

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init for pretraining: N(0, 0.02) weights, residual outputs scaled by depth (GPT-2)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.normal_(0.0, s, generator=generator)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        p = self.model.embed_tokens.weight  # a plain tensor even after inference.arrange_for_decode_
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch, self.config.num_key_value_heads, max_len, self.config.hd, dtype or p.dtype, p.device)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def hidden(self, input_ids, positions=None, mask=None, slots=None) -> torch.Tensor:
        """Final-normed hidden states (B, T, D).

        input_ids (B, T); positions (B, T) RoPE positions, default 0..T-1; mask (B, 1, T, S) bool,
        True where a query may attend, or Segments of packed documents (None: plain causal);
        slots (T,) cache slots to write.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if mask is None and self.config.sliding_window is not None and T > self.config.sliding_window:
            ones = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
            mask = causal_mask(ones, torch.arange(T, device=input_ids.device), self.config.sliding_window)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, slots, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, slots, recipes=self.training)
        return self.model.norm(x)

    def forward(self, input_ids, positions=None, mask=None, slots=None) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids, positions, mask, slots))  # (B, T, V)


def causal_mask(valid: torch.Tensor, q_slots: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Attention mask (B, 1, T, S) for queries at cache slots `q_slots` (T,) over keys (B, S).

    `valid` marks key slots holding real tokens (False for padding). A query sees keys at
    slots <= its own, within the sliding window. A query on a padding slot would see no
    key at all and give NaN; it may see itself, and its output is never used.
    """
    S = valid.shape[1]
    k_slots = torch.arange(S, device=valid.device)
    allowed = k_slots[None, :] <= q_slots[:, None]  # (T, S)
    if sliding_window is not None:
        allowed &= k_slots[None, :] > q_slots[:, None] - sliding_window
    mask = allowed[None] & valid[:, None, :]  # (B, T, S)
    mask |= k_slots[None, None, :] == q_slots[None, :, None]
    return mask[:, None]


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Mask (B, 1, T, T) for packed sequences: causal, and no attention across documents."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same_doc & causal)[:, None]
