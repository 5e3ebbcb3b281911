"""Load a model directory (plus an optional PEFT LoRA/QLoRA adapter) and its tokenizer for evaluation.

Evaluation never trains, so the adapter is loaded with `yunque.formats.peft` (every check,
QLoRA adapters onto the NF4 base they were trained against) and then merged into the weights
in memory (`yunque.lora.merge_lora`): generation runs at the base model's speed.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_for_eval(model_dir: str | Path, adapter: str | Path | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer), eval mode, adapter merged (see yunque.inference.load)."""
    from yunque.inference import load

    return load(model_dir, adapter, dtype or "auto")
