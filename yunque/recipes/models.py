"""`yunque import` (a GGUF file -> a Hugging Face model directory) and `yunque models` (the catalogue)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


def import_cmd(path: Path, *, out: Path, dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> Path:
    """Convert a GGUF file (llama.cpp's format) into a Hugging Face model directory.

    Args:
        path: the .gguf file (architecture llama, mistral or qwen2)
        out: the model directory to write (new, empty, or an earlier import to replace)
        dtype: dtype of the dequantised weights
    """
    from yunque.formats.gguf import IMPORT_FILE, import_gguf

    d = import_gguf(path, out, dtype)
    cfg = json.loads((d / "config.json").read_text())
    record = json.loads((d / IMPORT_FILE).read_text())
    types = ", ".join(f"{k}×{v}" for k, v in sorted(record["gguf"]["tensor_types"].items()))
    print(
        f"imported {path} ({cfg['architectures'][0]}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}; "
        f"{types}) -> {d} ({dtype})"
    )
    print(f"  source SHA-256 {record['sha256']} (recorded in {d / IMPORT_FILE})")
    return d


def models_cmd() -> list[dict]:
    """List the pretrained models yunque knows: name, source package, architecture, size, licence, where the file is.

    A listed name works wherever a model directory is accepted (--model NAME, train's model.path):
    it is converted once into the cache.
    """
    from yunque.models import CATALOGUE, cache_root, locate

    rows = []
    for m in CATALOGUE.values():
        src = locate(m)
        rows.append(
            {
                "name": m.name,
                "package": f"{m.package}=={m.version}",
                "architecture": m.architecture,
                "parameters": m.parameters,
                "licence": m.licence,
                "description": m.description,
                "file": str(src) if src else None,
                "converted": (cache_root() / m.name).is_dir(),
            }
        )
        size = f"{m.parameters / 1e6:.1f}M parameters"
        print(f"{m.name}  {m.architecture}, {size}, {m.licence}, from {m.package}=={m.version}")
        print(f"  {m.description}")
        print(f"  file: {src}" if src else f"  not installed: {m.install}")
        if rows[-1]["converted"]:
            print(f"  converted: {cache_root() / m.name}")
    return rows
