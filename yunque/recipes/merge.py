"""`yunque merge`: fold a LoRA/QLoRA adapter into its base model, giving a plain HF directory."""

from __future__ import annotations

from pathlib import Path

from yunque.errors import CheckpointError


def merge_cmd(
    *,
    base: str,
    adapter: Path,
    out: Path,
    original_base: bool = False,
    overwrite: bool = False,
) -> None:
    """Merge a PEFT LoRA adapter into its base model and write a Hugging Face model directory.

    Args:
        base: the base model directory (Hugging Face format) the adapter was trained on, or a name from
            `yunque models`
        adapter: the adapter directory (adapter_config.json + adapter_model.safetensors)
        out: where to write the merged model (tokenizer files are copied from base)
        original_base: for a QLoRA adapter, merge into the full-precision base weights instead of the
            NF4-dequantised ones it was trained against
        overwrite: replace a model that already exists in out
    """
    from yunque.formats.peft import merge_adapter
    from yunque.models import resolve_model

    base = str(resolve_model(base))
    out_p = Path(out)
    if out_p.resolve() == Path(base).resolve() or out_p.resolve() == Path(adapter).resolve():
        raise CheckpointError(f"{out}: --out must be a new directory, not the base or adapter directory")
    if (out_p / "config.json").exists() and not overwrite:
        raise CheckpointError(f"{out}: already holds a model (config.json); pass --overwrite to replace it")
    s = merge_adapter(base, adapter, out, original_base=original_base)
    cfg = s["config"]
    kinds = sorted({m.rsplit(".", 1)[-1] for m in s["modules"]})
    base_kind = "NF4-dequantised base (QLoRA)" if cfg.quantize_base else "full-precision base"
    print(
        f"merged {len(s['modules'])} LoRA modules ({', '.join(kinds)}; r={cfg.r}, alpha={cfg.alpha:g}, "
        f"scale={cfg.scale:g}) into the {base_kind}, {s['dtype']}"
    )
    tok = ", ".join(s["tokenizer_files"]) if s["tokenizer_files"] else "none found in base"
    print(f"wrote {s['out']} (tokenizer files copied: {tok})")
