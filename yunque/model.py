"""The Llama-family decoder, top to bottom.

Covers what Hugging Face calls LlamaForCausalLM (Llama 2, 3, 3.1 with llama3 RoPE scaling,
3.2 with tied embeddings), MistralForCausalLM (sliding window) and Qwen2ForCausalLM
(q/k/v bias). Module and parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj`)
and RoPE uses HF's rotate-half layout, so an HF state dict loads as is and LoRA targets are
the `nn.Linear` names users already know. This file imports only torch and yunque.ops, where
the operations with more than one implementation (attention, RMSNorm, SwiGLU) choose theirs.

Shapes: B batch, T query length, S key length (cache size), D hidden, H query heads,
K key/value heads, hd head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from yunque import ops


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
    def head_size(self) -> int:
        """The head dim in effect: `head_dim`, or hidden_size // num_attention_heads where that is None."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (hd/2,) on the CPU, including llama3 / linear context scaling."""
    hd = cfg.head_size
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


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a signed sin, (B, 1, T, hd) each, in HF's rotate-half layout.

    HF rotates with cat(-x2, x1) * sin. With the sign folded into the first half of sin once
    per forward, each layer's rotation is a roll: one op per q and k instead of a neg and a cat.
    """
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2); fp32 so long positions stay exact
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1).to(dtype)[:, None], torch.cat((-sin, sin), -1).to(dtype)[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every consumer (q/k/v, gate/up, the head) would cast the output to the autocast dtype on
        # its own: five copies per layer, each saved for backward. Casting once gives them one.
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return ops.rms_norm(x, self.weight, self.eps, dt)  # in fp32, cast back before the weight, as HF does


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        self.window = cfg.sliding_window
        d, hd = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=cfg.attention_out_bias)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, slots):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        # RoPE on q and k, k and v into the cache at `slots`, attention: one call, so that a fused
        # kernel may do all three (yunque's CPU kernel rotates q and k itself).
        y = ops.attention(q, k, v, rope=(cos, sin), mask=mask, cache=self.cache, slots=slots, window=self.window)
        return self.o_proj(y)  # y (B, T, H*hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x, recompute_cheap_activations: bool = False):
        gate, up = self.gate_proj(x), self.up_proj(x)
        h = ops.swiglu(gate, up)
        with ops.saved_as_recipe(h, lambda: ops.swiglu(gate, up), recompute_cheap_activations):
            return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, slots, recompute_cheap_activations: bool = False):
        """recompute_cheap_activations: keep the normed inputs and the SwiGLU product for backward as
        the recipes that made them (recomputed in backward), not as data.

        Each is one elementwise pass over tensors autograd saves anyway (the residual stream,
        gate and up), and together a large share of the saved activations (bench/NOTES.md,
        "Saved activations").
        Off under activation checkpointing, whose own saved-tensor hooks must see everything.
        """
        # The recipes must not hold the tensors they stand for, and must cast as forward did
        # (autocast may be off by backward).
        h1 = self.input_layernorm(x)
        dt = h1.dtype
        recompute = recompute_cheap_activations
        with ops.saved_as_recipe(h1, lambda: self.input_layernorm(x).to(dt), recompute):
            x2 = x + self.self_attn(h1, cos, sin, mask, slots)
        h2 = self.post_attention_layernorm(x2)
        with ops.saved_as_recipe(h2, lambda: self.post_attention_layernorm(x2).to(dt), recompute):
            return x2 + self.mlp(h2, recompute)


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
        p = self.model.embed_tokens.weight  # a plain tensor even after ops.arrange_for_decode_
        cfg = self.config
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(
                batch, cfg.num_key_value_heads, max_len, cfg.head_size, dtype or p.dtype, p.device
            )

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def hidden(self, input_ids, positions=None, mask=None, slots=None) -> torch.Tensor:
        """Final-normed hidden states (B, T, D).

        input_ids (B, T); positions (B, T) RoPE positions, default 0..T-1; mask (B, 1, T, S) bool,
        True where a query may attend, or ops.Segments of packed documents (None: plain causal);
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
                x = layer(x, cos, sin, mask, slots, recompute_cheap_activations=self.training)
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
