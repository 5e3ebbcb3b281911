"""Hugging Face model directories -> one GGUF file (llama.cpp, Ollama), written with the `gguf` package.

The file is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for `llama` (Llama and
Mistral without a sliding window) and `qwen2`: its tensor names, q/k rows (and biases) of `llama`
interleaved for its RoPE kernel, 1-D tensors in F32 and 2-D ones in the chosen type (F16 where a
row does not fill whole quantisation blocks, as the converter falls back), no output.weight when
the head is the embedding, llama3 RoPE as the per-frequency factors tensor rope_freqs.weight, and
the hyperparameters, tokenizer (yunque.formats.gguf_tokenizer.add_tokenizer) and file type under
llama.cpp's keys. q4_0 is what `llama-quantize --pure` would write, except the head (output.weight,
or the embedding when tied), which llama-quantize keeps at Q6_K and this writer at Q8_0 (gguf-py
has no k-quant quantiser).

Provenance goes under general.yunque.*: the SHA-256 of the source weights (and of the adapter), of
the GGUF the directory was imported from, and the data manifest that trained it (from the run.json
of a yunque training run whose recorded files include these weights).

Tensors are converted and written one at a time (gguf's streaming API), so peak memory is the fp32
model plus one tensor; the file is written beside `out` and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from yunque.errors import CheckpointError, YunqueError
from yunque.formats.gguf import IMPORT_FILE, _gguf, gguf_tensor_name, permute_qk

# --type -> (tensor type of 2-D weights, llama.cpp's file type)
TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# llama.cpp's converter writes Mistral as llama (full attention: see _arch)
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _arch(cfg, src) -> str:
    arch = ARCHS.get(cfg.architecture)
    if arch is None:
        raise CheckpointError(f"{src}: {cfg.architecture} has no GGUF export (supported: {', '.join(ARCHS)})")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        raise CheckpointError(
            f"{src}: sliding_window {cfg.sliding_window}: llama.cpp runs `llama` files with full attention, "
            "which would compute something else past the window"
        )
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    if kind not in ("default", "linear", "llama3") or arch == "qwen2" and kind == "llama3":
        raise CheckpointError(f"{src}: rope_type {kind!r} has no {arch} GGUF form")
    if arch == "qwen2" and (cfg.mlp_bias or cfg.attention_out_bias):
        raise CheckpointError(f"{src}: llama.cpp's qwen2 has biases on q/k/v only")
    return arch


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, tied: bool):
    """The GGML type of one tensor under --type `ftype`."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or name == "rope_freqs.weight":
        return q.F32
    kind = q[TYPES[ftype][0]]
    if kind == q.Q4_0 and name == ("token_embd.weight" if tied else "output.weight"):
        kind = q.Q8_0
    if shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return q.F16
    return kind


def _tensors(model) -> list[tuple[str, str | None]]:
    """(GGUF name, state-dict name) in llama.cpp's order; rope_freqs.weight has no state-dict name."""
    cfg = model.config
    out = []
    for hf in model.state_dict():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_tensor_name(hf)
        if name is None:
            raise CheckpointError(f"tensor {hf} has no GGUF name")
        out.append((name, hf))
        if hf == "model.embed_tokens.weight" and (cfg.rope_scaling or {}).get("rope_type") == "llama3":
            out.append(("rope_freqs.weight", None))
    return out


def _array(state: dict, cfg, name: str, hf: str | None, arch: str) -> np.ndarray:
    from yunque.model import rope_inv_freq

    if hf is None:  # llama.cpp divides each RoPE frequency by its factor: base / scaled
        plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
        return (plain / rope_inv_freq(cfg)).float().numpy()
    w = state[hf].detach().float().contiguous().numpy()
    if not np.isfinite(w).all():
        raise CheckpointError(f"tensor {hf} holds NaN or infinite values: llama.cpp would compute NaN")
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        w = permute_qk(w, cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads, to_gguf=True)
    return w


def _hyperparameters(w, cfg, ftype: str, n_params: int, name: str) -> None:
    gguf = _gguf()
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType[TYPES[ftype][1]])
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_size)
    if cfg.head_dim is not None and cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -- provenance -----------------------------------------------------------------------------------
def _digest(files: list[Path]) -> str:
    """SHA-256 of one file; of several, of their `sha256sum` listing."""
    from yunque.data.manifest import sha256_file

    if len(files) == 1:
        return sha256_file(files[0])
    listing = "".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _training_data(dirs: list[Path], digests: set[str]) -> dict | None:
    """run.json's data record, from a yunque training run (next to or above the weights) whose
    recorded files include one of these weights' digests."""
    for d in dirs:
        for path in (d / "run.json", d.parent / "run.json"):
            run = _read_json(path) if path.is_file() else None
            files = run.get("files_sha256") if isinstance(run, dict) else None
            if isinstance(files, dict) and digests & set(files.values()) and isinstance(run.get("data"), dict):
                return run["data"]
    return None


def _provenance(w, src: Path, adapter: Path | None) -> dict[str, str]:
    from yunque import __version__
    from yunque.data.manifest import sha256_file
    from yunque.formats.hf import weight_files

    record = {"general.yunque.version": __version__}
    weights = sorted(set(weight_files(src).values()))
    record["general.yunque.source_sha256"] = _digest(weights)
    digests = {sha256_file(p) for p in weights} if len(weights) > 1 else {record["general.yunque.source_sha256"]}
    dirs = [src]
    if adapter is not None:
        files = sorted(adapter.glob("adapter_model*.safetensors"))
        if files:
            record["general.yunque.adapter_sha256"] = _digest(files)
            digests = {sha256_file(p) for p in files}  # the adapter's run trained on the data that matters
            dirs = [adapter]
    imported = _read_json(src / IMPORT_FILE) if (src / IMPORT_FILE).is_file() else None
    if isinstance(imported, dict) and isinstance(imported.get("sha256"), str):
        record["general.yunque.imported_gguf_sha256"] = imported["sha256"]
    data = _training_data(dirs, digests)
    if data and isinstance(data.get("manifest_sha256"), str):
        record["general.yunque.data_manifest_sha256"] = data["manifest_sha256"]
        splits = (data.get("manifest_roots") or {}).get("splits") or {}
        roots = [
            f"{k}:{v['merkle_root']}"
            for k, v in sorted(splits.items())
            if isinstance(v, dict) and isinstance(v.get("merkle_root"), str)
        ]
        if roots:
            w.add_array("general.yunque.data_merkle_roots", roots)
    for key, value in record.items():
        w.add_string(key, str(value))
    return record


def _recorded_pre(src: Path) -> str | None:
    imported = _read_json(src / IMPORT_FILE) if (src / IMPORT_FILE).is_file() else None
    gguf_meta = imported.get("gguf") if isinstance(imported, dict) else None
    pre = gguf_meta.get("pre_tokenizer") if isinstance(gguf_meta, dict) else None
    return pre if isinstance(pre, str) else None


def _name(src: Path) -> str:
    imported = _read_json(src / IMPORT_FILE) if (src / IMPORT_FILE).is_file() else None
    name = ((imported or {}).get("gguf") or {}).get("name") if isinstance(imported, dict) else None
    return name if isinstance(name, str) and name else src.resolve().name


# -- writing --------------------------------------------------------------------------------------
def export_gguf(src: str | Path, out: str | Path, ftype: str = "f16", adapter: str | Path | None = None) -> dict:
    """Write `src` (+ `adapter`, merged) as the GGUF file `out`; returns what was written."""
    from yunque.formats.gguf_tokenizer import add_tokenizer, pre_tokenizer_name
    from yunque.formats.hf import read_config
    from yunque.formats.onnx_export import load_for_export
    from yunque.inference import load_tokenizer

    gguf = _gguf()
    if ftype not in TYPES:
        raise YunqueError(f"GGUF type {ftype!r} is not supported (supported: {', '.join(TYPES)})")
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    adapter = Path(adapter) if adapter is not None else None
    arch = _arch(read_config(src), src / "config.json")  # what llama.cpp cannot run is refused before loading
    tok = load_tokenizer(src, adapter)
    pre_tokenizer_name(json.loads(tok._rust.to_str()), tok.source)
    model = load_for_export(src, adapter)
    cfg = model.config
    state = model.state_dict()
    plan = []
    for name, hf in _tensors(model):
        shape = (cfg.head_size // 2,) if hf is None else tuple(state[hf].shape)
        plan.append((name, hf, shape, tensor_type(name, shape, ftype, cfg.tie_word_embeddings)))
    n_params = sum(int(np.prod(s)) for n, _, s, _ in plan if n != "rope_freqs.weight")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(tmp, arch)
    try:
        _hyperparameters(w, cfg, ftype, n_params, _name(src))
        pre = add_tokenizer(w, tok, cfg.vocab_size, cfg.pad_token_id, _recorded_pre(src), tok.source)
        provenance = _provenance(w, src, adapter)
        for name, _, shape, kind in plan:
            if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
                w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            else:
                raw = gguf.quant_shape_to_byte_shape(shape, kind)
                w.add_tensor_info(name, raw, np.dtype(np.uint8), int(np.prod(raw)), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        counts: dict[str, int] = {}
        for name, hf, _, kind in plan:
            w.write_tensor_data(gguf.quants.quantize(_array(state, cfg, name, hf, arch), kind))
            counts[kind.name] = counts.get(kind.name, 0) + 1
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return {
        "file": out,
        "architecture": arch,
        "type": ftype,
        "tensor_types": counts,
        "pre_tokenizer": pre,
        "bytes": out.stat().st_size,
        "provenance": provenance,
        "seconds": time.perf_counter() - t0,
    }


def check_out(out: Path, overwrite: bool) -> None:
    """--out names a file: refuse a directory, and an existing file unless --overwrite."""
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; --out names the .gguf file to write")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists; pass --overwrite to replace it")
