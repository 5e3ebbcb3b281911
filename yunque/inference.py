"""Everything a command needs to run a model: pick device and dtype, load model (+ adapter) and tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from yunque.errors import YunqueError
from yunque.formats.hf import check_finite, load_model
from yunque.model import Transformer
from yunque.ops import arrange_for_decode_

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


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


def load_tokenizer(model_dir: str | Path, adapter: str | Path | None = None):
    from yunque.tokenizer import Tokenizer

    # A fine-tune that added tokens ships its tokenizer with the adapter.
    for d in ([Path(adapter)] if adapter else []) + [Path(model_dir)]:
        if (d / "tokenizer.json").is_file():
            return Tokenizer.from_dir(d)
    raise YunqueError(
        f"{model_dir}: no tokenizer.json (train one with `yunque tokenizer train` or copy the base model's)"
    )


def load(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    quantize_base: bool | None = None,
    allow_nonfinite: bool = False,
) -> tuple[Transformer, object]:
    """(model in eval mode, tokenizer) from an HF directory.

    A PEFT adapter is loaded with every check and then merged into the weights: inference
    never trains, so it runs at the base model's speed. `quantize_base=None` merges a QLoRA
    adapter into the NF4-dequantised base it was trained on; False into the original weights.
    Weights holding NaN or Inf are refused (naming the tensor) unless `allow_nonfinite`.
    """
    from yunque.models import resolve_model

    model_dir = resolve_model(model_dir)
    if not model_dir.is_dir():
        raise YunqueError(f"{model_dir}: model directory not found")
    dev = resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    model = load_model(model_dir, dtype=dt, device=dev, quantized=True)
    quantized = "quantization_config" in model.config.extra
    if adapter is not None and quantized:
        raise YunqueError(
            f"{model_dir}: an adapter cannot be applied to a quantised model; merge it into the "
            "full-precision model (`yunque merge`), then quantise the merged model"
        )
    if adapter is not None:
        from yunque.formats.peft import load_peft_adapter
        from yunque.lora import merge_lora

        if not Path(adapter).is_dir():
            raise YunqueError(f"{adapter}: adapter directory not found")
        load_peft_adapter(model, adapter, quantize_base=quantize_base)
        merge_lora(model)
    if not allow_nonfinite:
        check_finite(
            model.named_parameters(),
            f"{model_dir}" + (f" + {adapter}" if adapter else ""),
            "the checkpoint is corrupt or its training diverged (`yunque serve --allow-nonfinite` serves it anyway)",
        )
    model.requires_grad_(False)  # inference only; a forward outside no_grad then builds no graph
    arrange_for_decode_(model)
    return model.eval(), load_tokenizer(model_dir, adapter)
