"""`yunque export`: a model directory (+ adapter) in, a file another runtime runs out."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from yunque.errors import CheckpointError


def export_cmd(
    model: str,
    *,
    format: Literal["onnx"],
    out: Path,
    adapter: Path | None = None,
    opset: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Export a model for another runtime: onnx (onnxruntime, onnxruntime-genai, optimum).

    Args:
        model: a Hugging Face model directory (full precision), or a name from `yunque models`
        format: onnx: the decoder with KV-cache inputs and outputs, fp32, weights in model.onnx.data
        out: the output directory
        adapter: a PEFT adapter directory, merged into the weights first
        opset: the ONNX opset (default 23)
        overwrite: replace an export that already exists in out
    """
    from yunque.formats import onnx_export
    from yunque.models import resolve_model

    src, out_p = resolve_model(model), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"{src}: model directory not found")
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
