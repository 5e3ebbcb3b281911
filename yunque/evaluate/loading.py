"""Load a model directory (plus an optional PEFT LoRA adapter) and its tokenizer for evaluation.

Evaluation never trains, so a LoRA adapter is merged into the base weights in memory
(W += scale * B @ A, scale = alpha / r, or alpha / sqrt(r) with rsLoRA): generation then
runs at the base model's speed. Anything the merge cannot represent exactly (DoRA,
modules_to_save, non-LoRA adapters) is refused with the field that asks for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from yunque.errors import CheckpointError, YunqueError


def load_tokenizer(model_dir: Path, adapter: Path | None = None):
    from yunque.tokenizer import Tokenizer

    # A fine-tune that added tokens ships its tokenizer with the adapter.
    src = adapter if adapter is not None and (adapter / "tokenizer.json").is_file() else model_dir
    return Tokenizer.from_dir(src)


def merge_lora_adapter(model, adapter_dir: Path) -> None:
    from yunque.formats.st import SafetensorsFile

    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key in ("use_dora", "modules_to_save", "fan_in_fan_out"):
        if cfg.get(key):
            raise CheckpointError(f"{cfg_path}: {key} is not supported for evaluation merges")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{adapter_dir}: no adapter_model.safetensors (pickled adapters are never loaded)")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    modules = dict(model.named_modules())
    with SafetensorsFile(weights) as f:
        names = list(f.entries)
        pairs: dict[str, dict[str, str]] = {}
        for n in names:
            part = next((p for p in ("lora_A", "lora_B") if f".{p}." in n), None)
            if part is None:  # e.g. lora_embedding_A or a saved module: never drop part of an adapter silently
                raise CheckpointError(f"{weights}: tensor {n} is not a LoRA A/B matrix of a linear layer (not supported)")
            base = n.split(f".{part}.")[0].removeprefix("base_model.model.")
            pairs.setdefault(base, {})[part] = n
        if not pairs:
            raise CheckpointError(f"{weights}: holds no lora_A/lora_B tensors")
        for base, ab in sorted(pairs.items()):
            if set(ab) != {"lora_A", "lora_B"}:
                raise CheckpointError(f"{weights}: {base} has only {', '.join(ab)}")
            mod = modules.get(base)
            if not isinstance(mod, torch.nn.Linear):
                raise CheckpointError(f"{weights}: {base} is not a linear layer of this model")
            a = f.read(ab["lora_A"]).float()
            b = f.read(ab["lora_B"]).float()
            if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features:
                raise CheckpointError(f"{weights}: {base} adapter shapes {list(b.shape)} x {list(a.shape)} "
                                      f"do not fit a {mod.out_features}x{mod.in_features} layer")
            with torch.no_grad():
                mod.weight += (scale * (b @ a)).to(mod.weight.dtype)


def load_for_eval(model_dir: str | Path, adapter: str | Path | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer), eval mode, adapter merged."""
    from yunque.formats.hf import load_model

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise YunqueError(f"{model_dir}: model directory not found")
    adapter_dir = Path(adapter) if adapter else None
    model = load_model(model_dir, dtype=dtype)
    if adapter_dir is not None:
        if not adapter_dir.is_dir():
            raise YunqueError(f"{adapter_dir}: adapter directory not found")
        if model.config.tie_word_embeddings:
            # A merge into a tied lm_head would silently change the embeddings too: untie first.
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        merge_lora_adapter(model, adapter_dir)
    return model.eval(), load_tokenizer(model_dir, adapter_dir)
