"""ONNX export of the decoder with a KV cache, in the layout onnxruntime-genai and optimum read.

    inputs   input_ids                  int64 (batch, sequence_length)
             attention_mask             int64 (batch, past_sequence_length + sequence_length), 1: a real token
             position_ids               int64 (batch, sequence_length)
             past_key_values.N.key      (batch, num_key_value_heads, past_sequence_length, head_dim), N per layer
             past_key_values.N.value    the same
    outputs  logits                     (batch, sequence_length, vocab_size)
             present.N.key / .value     (batch, num_key_value_heads, past_sequence_length + sequence_length, head_dim)

The first call passes empty past tensors (past_sequence_length 0). A query attends to the keys
the mask marks real, up to its own slot (and within Mistral's sliding window), as
`yunque.generate` does for left-padded batches.

yunque's static KVCache is written in place, which a graph cannot express; `DecoderWithPast`
runs the same submodules (the projections, norms' weights, embedding and head) with a
concatenated cache instead, in plain torch ops: the fused CPU kernels yunque uses otherwise
are ctypes calls that a trace cannot see.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from yunque.errors import CheckpointError, require
from yunque.model import Transformer, rope_cos_sin
from yunque.ops import apply_rope

OPSET = 23


class DecoderWithPast(nn.Module):
    """`model` as a function of (input_ids, attention_mask, position_ids, past) -> (logits, *present)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        cfg = model.config
        self.n_heads, self.n_kv, self.hd, self.window = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_size,
            cfg.sliding_window,
        )

    def _norm(self, norm, x):
        # Plain torch ops (HF's rounding): the exporter traces tensors, not yunque's CPU kernels.
        h = x.float()
        return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)

    def forward(self, input_ids, attention_mask, position_ids, past: tuple[torch.Tensor, ...]):
        B, T = input_ids.shape
        S = attention_mask.shape[1]
        x = self.model.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.model.inv_freq, position_ids, x.dtype)
        # Query t sits at slot S - T + t; it sees real keys up to it (and itself, so a padding
        # query has one key and no NaN; its output is never used).
        q_slot = torch.arange(T, device=x.device)[:, None] + (S - T)
        k_slot = torch.arange(S, device=x.device)[None, :]
        allowed = k_slot <= q_slot
        if self.window is not None:
            allowed = allowed & (k_slot > q_slot - self.window)
        mask = (allowed[None] & attention_mask[:, None, :].bool()) | (k_slot == q_slot)[None]  # (B, T, S)
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))[:, None]
        present = []
        for i, layer in enumerate(self.model.model.layers):
            a = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            q = a.q_proj(h).view(B, T, self.n_heads, self.hd).transpose(1, 2)
            k = a.k_proj(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
            v = a.v_proj(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            r = self.n_heads // self.n_kv  # grouped-query attention: each kv head serves r query heads
            kr = k[:, :, None].expand(B, self.n_kv, r, S, self.hd).reshape(B, self.n_heads, S, self.hd)
            vr = v[:, :, None].expand(B, self.n_kv, r, S, self.hd).reshape(B, self.n_heads, S, self.hd)
            # HF's eager attention: scores in the model's dtype, softmax in fp32.
            scores = torch.matmul(q, kr.transpose(-1, -2)) * self.hd**-0.5 + bias
            p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            y = torch.matmul(p, vr).transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
            x = x + a.o_proj(y)
            h = self._norm(layer.post_attention_layernorm, x)
            m = layer.mlp
            x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
        logits = self.model.lm_head(self._norm(self.model.model.norm, x))
        return (logits, *present)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _example(model: Transformer, B: int = 2, T: int = 3, P: int = 4):
    cfg, p = model.config, model.model.embed_tokens.weight
    ids = torch.arange(B * T).view(B, T) % cfg.vocab_size  # example values; the graph is traced, not fitted
    mask = torch.ones(B, P + T, dtype=torch.int64)
    pos = torch.arange(P, P + T).expand(B, T).contiguous()
    kv = (B, cfg.num_key_value_heads, P, cfg.head_size)
    past = tuple(torch.zeros(kv, dtype=p.dtype) for _ in range(2 * cfg.num_hidden_layers))
    return ids, mask, pos, past


def export_onnx(model: Transformer, out: str | Path, opset: int = OPSET) -> dict:
    """Write `out`/model.onnx and model.onnx.data (the weights) for `model` (plain nn.Linear weights);
    returns {"file", "seconds", "opset"}. The dynamo exporter (torch.export), the one PyTorch develops."""
    require("onnx", "export", "yunque export --format onnx")
    require("onnxscript", "export", "yunque export --format onnx")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = model.config.num_hidden_layers
    inputs, outputs = io_names(n)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    kv = {0: batch, 2: torch.export.Dim("past_sequence_length", min=0)}
    # The mask's length is past + sequence; torch.export derives that relation itself (AUTO).
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
        "past": tuple(kv for _ in range(2 * n)),
    }
    path = out / "model.onnx"
    t0 = time.perf_counter()
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # the exporter's notes on optional torchvision ops it does not find
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation and axis-naming chatter
            prog = torch.onnx.export(
                DecoderWithPast(model).eval(),
                _example(model),
                dynamo=True,
                opset_version=opset,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
                optimize=True,
                verbose=False,
            )
    finally:
        log.setLevel(level)
    (out / "model.onnx.data").unlink(missing_ok=True)  # no weights of an earlier export survive
    prog.save(str(path), external_data=True)
    _name_axes(path)
    return {"file": path, "seconds": time.perf_counter() - t0, "opset": opset}


def _name_axes(path: Path) -> None:
    """Name the derived total length as genai/optimum do (the exporter writes `s53`, `past + sequence`)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    total = {d.dim_param for d in m.graph.input[1].type.tensor_type.shape.dim[1:]}
    total |= {d.dim_param for o in m.graph.output[1:] for d in o.type.tensor_type.shape.dim[2:3]}
    total.discard("")
    for v in (*m.graph.input, *m.graph.output, *m.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in total:
                d.dim_param = "total_sequence_length"
    onnx.save_model(m, str(path))


def load_for_export(
    model_dir: str | Path, adapter: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> Transformer:
    """The model with plain weights (no decode packing), the adapter merged; NaN or Inf in them is refused."""
    from yunque.formats.hf import check_finite, load_model

    model = load_model(model_dir, dtype=dtype)
    if adapter is not None:
        from yunque.formats.peft import load_peft_adapter
        from yunque.lora import merge_lora

        if not Path(adapter).is_dir():
            raise CheckpointError(f"{adapter}: adapter directory not found")
        load_peft_adapter(model, adapter)  # QLoRA: onto the NF4 base it was trained on, as generate does
        merge_lora(model)
    where = f"{model_dir}" + (f" + {adapter}" if adapter is not None else "")
    check_finite(model.state_dict(), where, "the checkpoint is corrupt or its training diverged; nothing exported")
    return model.requires_grad_(False).eval()


def copy_model_files(src: Path, out: Path, adapter: Path | None = None) -> list[str]:
    """config.json, generation_config.json and the tokenizer files next to model.onnx, as optimum lays out a
    directory (the adapter's tokenizer first: a fine-tune that added tokens ships its own)."""
    from yunque.formats.peft import TOKENIZER_FILES

    copied = []
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        for d in ([adapter] if adapter and name in TOKENIZER_FILES else []) + [src]:
            if (d / name).is_file():
                shutil.copy2(d / name, out / name)
                copied.append(name)
                break
    return copied
