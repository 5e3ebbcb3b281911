"""`yunque quantize`: a model directory in, an int8 / int4 weight-only directory out (yunque.quantize)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from yunque.errors import CheckpointError, YunqueError


def quantize_cmd(
    model: str,
    *,
    bits: Literal[8, 4],
    out: Path,
    group_size: Literal[32, 64, 128] | None = None,
    asymmetric: bool = False,
    include_embedding: bool = False,
    include_head: bool = False,
    overwrite: bool = False,
) -> dict:
    """Quantise every linear layer's weights to int8 or int4 for inference (generate, chat, eval, serve).

    Args:
        model: a Hugging Face model directory (full precision), or a name from `yunque models`
        bits: 8 (per output channel, symmetric) or 4 (group-wise)
        out: where to write the quantised model (tokenizer and generation config are copied)
        group_size: int4 only: 32, 64 or 128 weights share a scale (default 32)
        asymmetric: int4 only: a zero point per group as well as a scale
        include_embedding: quantise the token embedding too (per row)
        include_head: quantise the output head too (per output channel); a tied model needs both
        overwrite: replace a model that already exists in out
    """
    import torch

    from yunque.formats.hf import check_finite, load_model, save_model, with_stop_ids
    from yunque.formats.peft import TOKENIZER_FILES
    from yunque.models import resolve_model
    from yunque.quantize import QuantConfig, quantize_model_, storage_bits

    src, out_p = resolve_model(model), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"{src}: model directory not found")
    if out_p.resolve() == src.resolve():
        raise CheckpointError(f"{out}: --out must be a new directory, not the source model")
    if (out_p / "config.json").exists() and not overwrite:
        raise CheckpointError(f"{out}: already holds a model (config.json); pass --overwrite to replace it")
    if bits == 8 and group_size is not None:
        raise YunqueError("--group-size applies to --bits 4; int8 has one scale per output channel")
    skip = tuple(n for n, inc in (("lm_head", include_head), ("model.embed_tokens", include_embedding)) if not inc)
    qc = QuantConfig(
        bits=bits, group_size=-1 if bits == 8 else (group_size or 32), sym=not asymmetric, modules_to_not_convert=skip
    )
    m = load_model(src)
    # Before quantising: a NaN would hide in its group's scale, and the error would name the scale.
    check_finite(m.state_dict(), f"{src}", "the model is corrupt or its training diverged; nothing written")
    float_bytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    with torch.no_grad():
        names = quantize_model_(m, qc)
    gen = None
    if (src / "generation_config.json").is_file():
        try:
            gen = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{src / 'generation_config.json'}: invalid JSON ({e})") from None
    save_model(m, out_p, generation_config=with_stop_ids(gen, src))
    for name in TOKENIZER_FILES:
        if (src / name).is_dir():
            shutil.copytree(src / name, out_p / name, dirs_exist_ok=True)
        elif (src / name).is_file():
            shutil.copy2(src / name, out_p / name)
    size = sum(f.stat().st_size for f in out_p.glob("*.safetensors"))
    g = "per output channel" if bits == 8 else f"group {qc.group_size}{'' if qc.sym else ', asymmetric'}"
    print(f"quantised {len(names)} modules to int{bits} ({g}; {storage_bits(m):.2f} bits per weight with scales)")
    print(
        f"wrote {out_p}: {size / 1e6:.1f} MB of weights (from {float_bytes / 1e6:.1f} MB)"
        + ("" if include_head or include_embedding else "; embedding and head kept in full precision")
    )
    return {"modules": names, "bits_per_weight": storage_bits(m), "bytes": size, "out": out_p}
