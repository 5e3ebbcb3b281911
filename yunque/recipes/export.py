"""`yunque export`: a model directory (+ adapter) in, a file another runtime runs out."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from yunque.errors import CheckpointError, YunqueError


def export_cmd(
    model: str,
    *,
    format: Literal["onnx", "gguf"],
    out: Path,
    adapter: Path | None = None,
    type: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] | None = None,
    opset: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Export a model for another runtime: gguf (llama.cpp, Ollama) or onnx (onnxruntime, onnxruntime-genai, optimum).

    Args:
        model: a Hugging Face model directory (full precision), or a name from `yunque models`
        format: gguf: one file with the weights, tokenizer and chat template, as llama.cpp's converter
            writes it; onnx: the decoder with KV-cache inputs and outputs, fp32, weights in model.onnx.data
        out: gguf: the .gguf file to write; onnx: the output directory
        adapter: a PEFT adapter directory, merged into the weights first
        type: gguf only: the weights' type, f32, f16, bf16, q8_0 or q4_0 (default f16; norms stay f32)
        opset: onnx only: the ONNX opset (default 23)
        overwrite: replace an export that already exists in out
    """
    from yunque.models import resolve_model

    src, out_p = resolve_model(model), Path(out)
    if format != "gguf" and type is not None:
        raise YunqueError(f"--type {type} applies to --format gguf only (--format {format} exports fp32)")
    if format != "onnx" and opset is not None:
        raise YunqueError(f"--opset applies to --format onnx only, not {format}")
    if not src.is_dir():
        raise CheckpointError(f"{src}: model directory not found")
    if format == "gguf":
        return _gguf(src, out_p, type or "f16", adapter, overwrite)
    from yunque.formats import onnx_export

    if out_p.resolve() == src.resolve():
        raise CheckpointError(f"{out}: --out must be a new directory, not the source model")
    if (out_p / "model.onnx").exists() and not overwrite:
        raise CheckpointError(f"{out}: already holds model.onnx; pass --overwrite to replace it")
    m = onnx_export.load_for_export(src, adapter)
    info = onnx_export.export_onnx(m, out_p, opset or onnx_export.OPSET)
    copied = onnx_export.copy_model_files(src, out_p, Path(adapter) if adapter else None)
    cfg = m.config
    print(
        f"exported {src} to {info['file']} (opset {info['opset']}, {cfg.num_hidden_layers} layers, "
        f"KV cache of {cfg.num_key_value_heads} heads x {cfg.head_size}) in {info['seconds']:.1f}s; "
        f"copied {', '.join(copied) or 'no config or tokenizer files'}"
    )
    return {**info, "copied": copied}


def _gguf(src: Path, out: Path, ftype: str, adapter: Path | None, overwrite: bool) -> dict:
    from yunque.formats.gguf_export import check_out, export_gguf

    check_out(out, overwrite)
    info = export_gguf(src, out, ftype, adapter)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info["tensor_types"].items()))
    print(
        f"exported {src}{f' + {adapter}' if adapter else ''} to {out} ({info['architecture']}, {ftype}: {kinds}; "
        f"tokenizer gpt2/{info['pre_tokenizer']}; {info['bytes'] / 2**20:.1f} MiB) in {info['seconds']:.1f}s"
    )
    return info
