"""PEFT LoRA adapter directories: adapter_config.json + adapter_model.safetensors.

What we write, `peft.PeftModel.from_pretrained(transformers_model, dir)` loads with identical
logits; what peft writes (`save_pretrained`), we load. Tensor names are PEFT's:
`base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r).

Loading is strict: a LoRA variant we do not implement (DoRA, biases, rank patterns,
modules_to_save, ...) is refused by name rather than loaded into something that computes a
different function. QLoRA settings (NF4 block size, double quantisation) are not PEFT
config fields; they travel in the safetensors metadata under `yunque.lora`, which peft ignores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from yunque.errors import CheckpointError, ConfigError
from yunque.formats.safetensors_io import SafetensorsFile
from yunque.lora import (
    LoraConfig,
    LoRALinear,
    _matches,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
)
from yunque.quant import NF4Linear
from yunque.untrusted import inside, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_META_KEY = "yunque.lora"
# PEFT LoRA options that change the computed function; loading refuses any non-default value.
# (layers_to_transform / exclude_modules need no support: we wrap exactly the modules the file has.)
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
}


def _peft_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """cfg.target_modules when it selects exactly the wrapped modules, else the wrapped modules' full names."""
    wrapped = set(lora_modules(model))
    inside = tuple(f"{n}." for n in wrapped)  # LoRALinear internals (base, lora_A, lora_B) are not candidates
    candidates = {
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, NF4Linear, LoRALinear)) and not n.startswith(inside)
    }
    selected = {n for n in candidates if any(_matches(n, t) for t in cfg.target_modules)}
    return list(cfg.target_modules) if selected == wrapped else sorted(wrapped)


def peft_config(model: nn.Module, cfg: LoraConfig, base_model_name_or_path: str = "") -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": _peft_targets(model, cfg),
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        **_UNSUPPORTED,
    }


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | Path,
    cfg: LoraConfig,
    base_model_name_or_path: str = "",
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's adapter as a PEFT directory; other files in `out_dir` are kept.

    `tensors`: the adapter weights when the model's own are not whole (FSDP shards, gathered by
    the caller), keyed as `lora_state_dict` keys them; the model still gives the module layout.
    Both files are written to a temporary sibling directory first and moved into place, so an
    interrupted save never leaves a config next to half-written weights. Weights holding NaN or
    Inf are refused (naming the tensor), and nothing is written.
    """
    from safetensors.torch import save_file

    from yunque.formats.hf import check_finite

    sd = lora_state_dict(model)
    if tensors is not None:
        if set(tensors) != set(sd):
            raise ConfigError(
                f"save_peft_adapter: tensors do not match the model's LoRA modules "
                f"(e.g. {sorted(set(tensors) ^ set(sd))[:2]})"
            )
        sd = tensors
    if not sd:
        raise ConfigError("save_peft_adapter: the model has no LoRA modules (call apply_lora first)")
    for name, mod in lora_modules(model).items():
        if mod.r != cfg.r or abs(mod.scale - cfg.scale) > 1e-12 * cfg.scale:
            raise ConfigError(
                f"save_peft_adapter: {name} has r={mod.r}, scale={mod.scale:g} but the config says "
                f"r={cfg.r}, scale={cfg.scale:g}; pass the LoraConfig the model was wrapped with"
            )
    tensors = {PREFIX + k: v.detach().contiguous().cpu() for k, v in sd.items()}
    check_finite(tensors, f"{out_dir}: not written", "the adapter's training diverged")
    meta = {
        "format": "pt",
        _META_KEY: json.dumps(
            {"quantize_base": cfg.quantize_base, "double_quant": cfg.double_quant, "block_size": cfg.block_size}
        ),
    }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata=meta)
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(model, cfg, base_model_name_or_path), indent=2) + "\n")
        if out.exists():
            for name in (WEIGHTS_FILE, CONFIG_FILE):  # weights first: a config is never newer than its weights
                os.replace(tmp / name, out / name)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_peft_config(adapter_dir: str | Path) -> tuple[dict[str, Any], Path]:
    d = Path(adapter_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: adapter directory not found")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a PEFT adapter directory needs {CONFIG_FILE})")
    conf = read_json(path, CheckpointError)
    if not isinstance(conf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if conf.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {conf.get('peft_type')!r}; only LORA adapters are supported")
    for key, default in _UNSUPPORTED.items():
        value = conf.get(key, default)
        if value != default and not (value in (None, {}, [], False) and default in (None, {}, [], False)):
            raise CheckpointError(f"{path}: {key}={value!r} is not supported (yunque loads plain LoRA adapters)")
    for key in ("r", "lora_alpha"):
        v = conf.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
            raise CheckpointError(f"{path}: field {key!r} is missing or not a number")
    if conf["r"] != int(conf["r"]) or not 0 < conf["r"] <= 1 << 16:
        raise CheckpointError(f"{path}: field 'r' must be a positive integer, got {conf['r']!r}")
    tm = conf.get("target_modules")
    if (
        tm is not None
        and not isinstance(tm, str)
        and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm))
    ):
        raise CheckpointError(
            f"{path}: target_modules must be a list of module names or a pattern string, got {tm!r:.100}"
        )
    return conf, path


def _read_weights(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    path = inside(d, WEIGHTS_FILE, d, CheckpointError)  # a symlink out of the adapter directory is refused
    if not path.is_file():
        pickles = [p.name for p in d.glob("adapter_model.bin")]
        extra = (
            (
                f"; only {pickles[0]} found, a pickle file yunque never loads (convert it once with peft: "
                "PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
            )
            if pickles
            else ""
        )
        raise CheckpointError(f"{path}: not found{extra}")
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}, f.metadata, path


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path, quantize_base: bool | None = None) -> LoraConfig:
    """Wrap `model` with the adapter in `adapter_dir` (ours or one peft wrote) and load its weights.

    quantize_base: store the frozen base in NF4 (QLoRA); None = as the adapter was trained (its
    yunque metadata), False for adapters written by peft. Every check runs before the model is
    touched: a bad adapter raises CheckpointError naming the file and tensor and leaves it unchanged.
    """
    conf, conf_path = read_peft_config(adapter_dir)
    tensors, meta, wpath = _read_weights(Path(adapter_dir))
    qmeta = {}
    if _META_KEY in meta:
        try:
            qmeta = json.loads(meta[_META_KEY])
        except (ValueError, RecursionError):
            raise CheckpointError(f"{wpath}: metadata {_META_KEY} is not valid JSON") from None
        if not isinstance(qmeta, dict):
            raise CheckpointError(f"{wpath}: metadata {_META_KEY} is not a JSON object")
    sd: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise CheckpointError(
                f"{wpath}: tensor {key} is not a LoRA weight (expected {PREFIX}<module>.lora_A.weight / .lora_B.weight)"
            )
        sd[key[len(PREFIX) :]] = t
    if not sd:
        raise CheckpointError(f"{wpath}: holds no LoRA tensors")
    names = sorted({k.rsplit(".", 2)[0] for k in sd})
    r = int(conf["r"])
    for n in names:
        try:
            mod = model.get_submodule(n)
        except AttributeError:
            raise CheckpointError(
                f"{wpath}: tensor {PREFIX}{n}.lora_A.weight: target module {n} not found in the model"
            ) from None
        if not isinstance(mod, (nn.Linear, NF4Linear)):
            raise CheckpointError(
                f"{wpath}: tensor {PREFIX}{n}.lora_A.weight: target module {n} is a "
                f"{type(mod).__name__}, not a linear layer"
            )
        for part, shape in (("lora_A", (r, mod.in_features)), ("lora_B", (mod.out_features, r))):
            key = f"{n}.{part}.weight"
            if key not in sd:
                raise CheckpointError(f"{wpath}: tensor {PREFIX}{key} is missing")
            if tuple(sd[key].shape) != shape:
                raise CheckpointError(
                    f"{wpath}: tensor {PREFIX}{key} has shape {list(sd[key].shape)}, the model "
                    f"needs {list(shape)} (r={r} from {conf_path.name}, {n} is {mod.in_features}->{mod.out_features})"
                )
    targets = conf.get("target_modules")
    if isinstance(targets, list):
        outside = [n for n in names if not any(_matches(n, t) for t in targets)]
        if outside:
            raise CheckpointError(
                f"{wpath}: tensor {PREFIX}{outside[0]}.lora_A.weight is for a module that "
                f"target_modules {targets} in {conf_path.name} does not select"
            )
    else:  # a regex or "all-linear": the file's modules are the targets
        targets = names
    try:
        cfg = LoraConfig(
            r=r,
            alpha=float(conf["lora_alpha"]),
            dropout=float(conf.get("lora_dropout") or 0.0),
            target_modules=list(targets),
            use_rslora=bool(conf.get("use_rslora", False)),
            quantize_base=bool(qmeta.get("quantize_base", False)) if quantize_base is None else quantize_base,
            double_quant=bool(qmeta.get("double_quant", False)) and quantize_base is not False,
            block_size=int(qmeta.get("block_size", 64)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{conf_path}: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{conf_path} / {wpath.name} metadata: a LoRA setting has the wrong type ({e})") from None
    apply_lora(model, cfg, names=names)
    load_lora_state_dict(model, sd, source=str(wpath))
    return cfg


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
)


def merge_adapter(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, original_base: bool = False
) -> dict[str, Any]:
    """base HF dir + PEFT adapter -> merged HF dir (tokenizer files copied); returns a summary.

    An adapter trained with QLoRA is merged into the NF4-dequantised base it was trained on, so
    the merged model computes what was trained; `original_base` merges into the full-precision
    weights instead.
    """
    from yunque.formats.hf import check_finite, checkpoint_dtype, load_model, save_model, with_stop_ids
    from yunque.lora import merge_lora

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    model = load_model(base_dir)
    dtype = checkpoint_dtype(base_dir) or next(model.parameters()).dtype
    cfg = load_peft_adapter(model, adapter_dir, quantize_base=False if original_base else None)
    merged = merge_lora(model)
    check_finite(
        model.state_dict(), f"{base_dir} + {adapter_dir}", "the base or the adapter is corrupt; nothing written"
    )
    gen_path = base_dir / "generation_config.json"
    gen = None
    if gen_path.is_file():
        gen = read_json(gen_path, CheckpointError)
        if not isinstance(gen, dict):
            raise CheckpointError(f"{gen_path}: expected a JSON object")
    # A tokenizer file linked to something outside the base model (a key, /etc/shadow) must not be
    # copied into the merged model, which is made to be shared.
    for name in TOKENIZER_FILES:
        inside(base_dir, name, base_dir, CheckpointError)
        if (base_dir / name).is_dir():
            for f in (base_dir / name).rglob("*"):
                inside(base_dir, f.relative_to(base_dir).as_posix(), base_dir, CheckpointError)
    save_model(model, out_dir, generation_config=with_stop_ids(gen, base_dir))
    copied = []
    for name in TOKENIZER_FILES:
        src = base_dir / name
        if src.is_dir():
            shutil.copytree(src, out_dir / name, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, out_dir / name)
        else:
            continue
        copied.append(name)
    return {
        "modules": merged,
        "config": cfg,
        "dtype": str(dtype).removeprefix("torch."),
        "tokenizer_files": copied,
        "out": out_dir,
    }
