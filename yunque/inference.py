"""Everything a command needs to run a model: pick device and dtype, load model (+ adapter) and tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from yunque.errors import YunqueError
from yunque.formats.hf import load_model
from yunque.model import Transformer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise YunqueError(f"device {device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA (fast and safe there), fp32 on CPU (bf16 kernels are slower on most CPUs)."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise YunqueError(f"dtype {dtype!r} is unknown (known: auto, {', '.join(_DTYPES)})")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class PackedLinear(torch.nn.Module):
    """An inference-only `nn.Linear` whose weight oneDNN has re-laid out for its own GEMM kernels.

    Decode is a chain of GEMVs streaming every weight from memory once per token. On this
    project's 2-core CPU, oneDNN on a pre-packed weight streams it faster than MKL does on a
    plain one, and uses both cores where MKL's fp32 GEMV uses one (plain vs packed, interleaved,
    56M model, greedy, same tokens: fp32 62 -> 82 tok/s at batch 1, 210 -> 304 at batch 8; bf16
    89 -> 107 and 329 -> 413; `bench/generate.py` gives the comparison with transformers). Prefill and perplexity GEMMs are equal or faster too. The packed
    weight has no autograd and an opaque layout, so this is the last step before inference;
    `state_dict()` still gives the plain weight, so such a model saves like any other.
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
    Otherwise, and with `pack=False`: MKL reads an fp32 (out, in) row-major weight at ~9-10 GB/s
    in a GEMV but at ~14-15 GB/s stored column-major, where F.linear's x @ W.T is a plain
    row-major GEMM (1.63x at batch 1 on 167 MB of Llama-shaped weights); bf16 stays row-major.
    """
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


def load_tokenizer(model_dir: str | Path, adapter: str | Path | None = None):
    from yunque.tokenizer import Tokenizer

    # A fine-tune that added tokens ships its tokenizer with the adapter.
    for d in ([Path(adapter)] if adapter else []) + [Path(model_dir)]:
        if (d / "tokenizer.json").is_file():
            return Tokenizer.from_dir(d)
    raise YunqueError(f"{model_dir}: no tokenizer.json (train one with `yunque tokenizer train` or copy the base model's)")


def load(model_dir: str | Path, adapter: str | Path | None = None, dtype: str | torch.dtype = "auto",
         device: str = "auto", quantize_base: bool | None = None) -> tuple[Transformer, object]:
    """(model in eval mode, tokenizer) from an HF directory.

    A PEFT adapter is loaded with every check and then merged into the weights: inference
    never trains, so it runs at the base model's speed. `quantize_base=None` merges a QLoRA
    adapter into the NF4-dequantised base it was trained on; False into the original weights.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise YunqueError(f"{model_dir}: model directory not found")
    dev = resolve_device(device)
    model = load_model(model_dir, dtype=dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev), device=dev)
    if adapter is not None:
        from yunque.formats.peft import load_peft_adapter
        from yunque.lora import merge_lora

        if not Path(adapter).is_dir():
            raise YunqueError(f"{adapter}: adapter directory not found")
        load_peft_adapter(model, adapter, quantize_base=quantize_base)
        merge_lora(model)
    model.requires_grad_(False)  # inference only; a forward outside no_grad then builds no graph
    arrange_for_decode_(model)
    return model.eval(), load_tokenizer(model_dir, adapter)
