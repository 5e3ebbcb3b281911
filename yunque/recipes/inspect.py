"""`yunque inspect` and `yunque init`: look into a checkpoint folder, or make a fresh one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from yunque.data.manifest import sha256_file
from yunque.errors import YunqueError
from yunque.formats.hf import read_config, save_model, weight_files
from yunque.formats.model_limits import parameter_count
from yunque.formats.safetensors_io import SafetensorsFile
from yunque.model import Transformer
from yunque.presets import PRESETS, get_preset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def inspect_cmd(path: Path, hashes: bool = True) -> dict:
    """Show a model directory's architecture, parameter count, dtype, files and their SHA-256.

    Args:
        path: a Hugging Face model directory
        hashes: compute the SHA-256 of every file
    """
    p = Path(path)
    cfg = read_config(p)
    weight_files(p)  # refuses pickle-only and incomplete directories
    n_params = parameter_count(cfg)  # arithmetic: a config naming a huge model is shown, not built
    dtypes: dict[str, int] = {}
    for st in sorted(p.glob("*.safetensors")):
        with SafetensorsFile(st) as f:
            for name in f.keys():
                dt = str(f.entries[name][0]).removeprefix("torch.")
                dtypes[dt] = dtypes.get(dt, 0) + 1
    info = {
        "architecture": cfg.architecture,
        "parameters": n_params,
        "dtype": dtypes,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_size,
        "vocab_size": cfg.vocab_size,
        "rope": {"theta": cfg.rope_theta, "scaling": cfg.rope_scaling},
        "tied_embeddings": cfg.tie_word_embeddings,
        "files": [
            {"name": f.name, "bytes": f.stat().st_size, **({"sha256": sha256_file(f)} if hashes else {})}
            for f in sorted(p.iterdir())
            if f.is_file()
        ],
    }
    print(f"{p}: {cfg.architecture}, {n_params / 1e6:.2f}M parameters, dtype {', '.join(dtypes) or '?'}")
    print(
        f"  {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads} "
        f"(kv {cfg.num_key_value_heads}, head dim {cfg.head_size}), vocab {cfg.vocab_size}, "
        f"rope theta {cfg.rope_theta:g}{' ' + cfg.rope_scaling['rope_type'] if cfg.rope_scaling else ''}"
        f"{', tied embeddings' if cfg.tie_word_embeddings else ''}"
    )
    for f in info["files"]:
        print(f"  {f['name']:<40} {f['bytes']:>14,d}  {f.get('sha256', '')}")
    return info


def init_cmd(
    out: str, preset: str = "tiny", tokenizer: str | None = None, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a randomly initialised model from a preset (and copy a tokenizer next to it).

    Args:
        out: output directory
        preset: model shape, one of the presets (tiny, small, base, base-125m, llama-3.2-1b, ...)
        tokenizer: directory holding tokenizer.json; its vocabulary size is used
        seed: random seed of the initialisation
        dtype: float32 or bfloat16
    """
    if preset not in PRESETS:
        raise YunqueError(f"--preset {preset!r} is unknown (known: {', '.join(PRESETS)})")
    overrides = {}
    if tokenizer is not None:
        from yunque.inference import load_tokenizer

        tok = load_tokenizer(tokenizer)
        overrides = dict(
            vocab_size=tok.vocab_size,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.stop_ids or tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    cfg = get_preset(preset, **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    model = model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    save_model(model, out)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy(Path(tokenizer) / name, Path(out) / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: preset {preset}, {n / 1e6:.2f}M parameters, {json.dumps(dtype)}")
    return Path(out)
