"""Load a model directory (plus an optional PEFT LoRA/QLoRA adapter) and its tokenizer for evaluation.

Evaluation never trains, so the adapter is loaded with `yunque.formats.peft` (every check,
QLoRA adapters onto the NF4 base they were trained against) and then merged into the weights
in memory (`yunque.lora.merge_lora`): generation runs at the base model's speed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from yunque.errors import YunqueError


def load_tokenizer(model_dir: Path, adapter: Path | None = None):
    from yunque.tokenizer import Tokenizer

    # A fine-tune that added tokens ships its tokenizer with the adapter.
    src = adapter if adapter is not None and (adapter / "tokenizer.json").is_file() else model_dir
    return Tokenizer.from_dir(src)


def load_for_eval(model_dir: str | Path, adapter: str | Path | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer), eval mode, adapter merged."""
    from yunque.formats.hf import load_model

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise YunqueError(f"{model_dir}: model directory not found")
    adapter_dir = Path(adapter) if adapter else None
    model = load_model(model_dir, dtype=dtype)
    if adapter_dir is not None:
        from yunque.formats.peft import load_peft_adapter
        from yunque.lora import merge_lora

        if not adapter_dir.is_dir():
            raise YunqueError(f"{adapter_dir}: adapter directory not found")
        load_peft_adapter(model, adapter_dir)
        merge_lora(model)
    return model.eval(), load_tokenizer(model_dir, adapter_dir)
