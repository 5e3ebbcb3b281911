"""The `--dry-run` peak-memory estimate per process, term by term.

The head's term is sized with `loss._chunk_rows`, the chunk `linear_cross_entropy` allocates,
so a change to the chunking changes the estimate too (tests/train/test_memory_estimate.py
checks the term against what loss.py allocates).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from yunque.model import Transformer
from yunque.train.config import TrainConfig
from yunque.train.loss import _chunk_rows


def head_chunk_bytes(vocab: int, rows: int, compute_dtype: torch.dtype) -> int:
    """Peak bytes of the (chunk, vocab) buffers `linear_cross_entropy` holds at once when training on `rows` targets.

    Its PyTorch path keeps the chunk's logits (compute dtype) for the whole loop. Each chunk then
    makes an fp32 log-softmax, before it (in bf16) an fp32 copy of the logits, and after it (in
    bf16) the gradient in the compute dtype (in fp32 it is written over the log-softmax). The
    previous chunk's log-softmax and gradient are still alive while the next chunk's log-softmax
    runs, so from the second chunk on both chunks' buffers count. yunque's fused CPU kernel keeps
    only the logits, so there this is an upper bound.
    """
    item = compute_dtype.itemsize
    acc = torch.promote_types(compute_dtype, torch.float32).itemsize
    cast = item != acc
    chunk = min(_chunk_rows(vocab, item), rows)
    second = min(chunk, rows - chunk)  # every chunk after the first is this size or smaller
    during = acc + (acc if cast else 0)  # per row, while a chunk's log-softmax runs
    left = acc + (item if cast else 0)  # per row, what a finished chunk leaves until the next replaces it
    return vocab * (chunk * item + max(chunk * during, (chunk * left + second * during) if second else 0))


def head_bytes(model: Transformer, rows: int, compute_dtype: torch.dtype) -> int:
    """The loss's own buffers at the step's peak: the chunk, d hidden, and a (V, D) product for a trained bf16 head."""
    head, mc = model.lm_head, model.config
    vocab, dim = mc.vocab_size, mc.hidden_size
    if type(head) is not nn.Linear:  # a wrapped head (LoRA on lm_head): whole logits, fp32 log-probs and gradient
        return rows * vocab * (compute_dtype.itemsize + 8 + (4 if compute_dtype.itemsize != 4 else 0))
    residual = model.model.embed_tokens.weight.dtype.itemsize
    n = head_chunk_bytes(vocab, rows, compute_dtype) + rows * dim * residual  # d hidden, as the hidden states
    if head.weight.requires_grad and compute_dtype != torch.float32:
        n += vocab * dim * compute_dtype.itemsize  # each chunk's weight gradient before it is added in fp32
    return n


def estimate_memory(model: Transformer, cfg: TrainConfig, world: int = 1) -> dict[str, float]:
    """Peak memory per process in GiB: weights, grads, AdamW moments, activations, the loss head, total."""
    mc = model.config
    weights = sum(
        t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
    )  # NF4 codes are buffers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shards = world if cfg.parallel == "fsdp" else 1
    B, T, Dm, F, L = cfg.micro_batch, cfg.data.seq_len, mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    act_bytes = 2 if cfg.precision == "bf16" else 4
    per_layer = (
        B * T * (8 * Dm + 4 * F) * act_bytes + B * mc.num_attention_heads * T * T * act_bytes
    )  # attention probs if unfused
    acts = (L * B * T * Dm * act_bytes + per_layer) if cfg.grad_checkpointing else L * per_layer
    head_dtype = torch.bfloat16 if cfg.precision == "bf16" else next(model.lm_head.parameters()).dtype
    est = {
        "weights": weights / shards,
        "grads": trainable * 4 / shards,
        "optimizer": trainable * 8 / shards,
        "activations": acts,
        "head": head_bytes(model, B * T, head_dtype),
    }
    est["total"] = sum(est.values())
    return {k: v / (1 << 30) for k, v in est.items()}
