"""GGUF checkpoints (llama.cpp's file format) -> Hugging Face model directories.

The file is read with the `gguf` package (llama.cpp's own reader) and dequantised with its
`gguf.quants.dequantize`, one tensor at a time: each tensor is renamed to its Hugging Face
name, the rotary rows of q/k are put back in HF's rotate-half order (llama.cpp's converter
interleaves them for its RoPE kernel; Qwen2 files are not permuted), converted to the
output dtype and written to model.safetensors at once, so peak memory is about one tensor,
not the model. The metadata becomes config.json; the tokenizer metadata becomes
tokenizer.json (byte-level BPE split the way llama.cpp splits for the file's
`tokenizer.ggml.pre`, or SentencePiece-style BPE with byte fallback), tokenizer_config.json
(special tokens, chat template) and generation_config.json; gguf_import.json records the
source file's SHA-256.

Everything but the weights' values is checked before any weight is dequantised; the output is
written into a temporary sibling directory and renamed into place. Anything wrong with the
file (an unknown architecture, tokenizer or quantisation type, a truncated or corrupt file,
NaN weights) is one CheckpointError naming it.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yunque.errors import CheckpointError, missing_extra

IMPORT_FILE = "gguf_import.json"  # provenance: what the directory was converted from
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp writes Mistral 7B-style models as `llama`; the file's name tells them apart.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(0|[1-9]\d*)\.(\w+)\.(weight|bias)")


def hf_tensor_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name (None: no counterpart)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m[2] in _BLOCK_NAMES:
        return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
    return None


def gguf_tensor_name(hf: str) -> str | None:
    """The llama.cpp name of a Hugging Face tensor name (None: no counterpart); `hf_tensor_name` inverted."""
    for gguf_name, name in _GLOBAL_NAMES.items():
        if name == hf:
            return gguf_name
    m = re.fullmatch(r"model\.layers\.(0|[1-9]\d*)\.([\w.]+)\.(weight|bias)", hf)
    short = next((k for k, v in _BLOCK_NAMES.items() if m and v == m[2]), None)
    return f"blk.{m[1]}.{short}.{m[3]}" if short else None


def permute_qk(w: np.ndarray, n_heads: int, *, to_gguf: bool) -> np.ndarray:
    """q/k rows (or biases) between HF's rotate-half order and llama.cpp's interleaved pairs.

    llama.cpp's converter interleaves each head's rotary halves into (x0, x_half, x1, ...) pairs
    for its RoPE kernel; `to_gguf=False` undoes it."""
    half = w.shape[0] // n_heads // 2
    split = (n_heads, 2, half) if to_gguf else (n_heads, half, 2)
    return w.reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- reading -------------------------------------------------------------------------------------
class _Truncated(Exception):
    pass


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError as e:
        raise missing_extra("gguf", "gguf", "reading GGUF files", e.name) from None
    return gguf


@functools.cache
def _reader_class():
    gguf = _gguf()

    class Reader(gguf.GGUFReader):
        """GGUFReader that refuses to read past the end of the file.

        The stock reader slices its memory map, and a slice past the end is silently short:
        an array whose stated length overruns the file would loop over empty reads for as
        long as the (corrupt) length says, i.e. hang. Here every read is bounds-checked, and an
        array must fit in what is left of the file before its elements are read."""

        def _get(self, offset, dtype, count=1, override_order=None):
            count = int(count)
            dt = np.dtype(dtype)
            end = int(offset) + dt.itemsize * count
            if count < 0 or end > self.data.size:
                raise _Truncated(f"needs {end} bytes, the file has {self.data.size}")
            raw = self.__dict__.get("_flat")
            if raw is None:  # a plain view: slicing np.memmap is ~5x slower (it wraps every slice)
                raw = self._flat = self.data.view(np.ndarray)
            arr = raw[int(offset) : end].view(dt)
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == gguf.GGUFValueType.ARRAY:
                item = int(self._get(orig_offs, np.uint32)[0])
                n = int(self._get(orig_offs + 4, np.uint64)[0])
                scalar = self.gguf_scalar_to_np.get(item)
                least = np.dtype(scalar).itemsize if scalar else 12 if item == gguf.GGUFValueType.ARRAY else 8
                if n * least > self.data.size - orig_offs - 12:
                    raise _Truncated(f"an array of {n} items at byte {orig_offs} overruns the file")
            return super()._get_field_parts(orig_offs, raw_type)

    return Reader


def open_gguf(path: str | Path):
    """A bounds-checked `gguf.GGUFReader` over `path`; any malformation is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'not a file' if path.exists() else 'not found'}")
    reader_cls = _reader_class()
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return reader_cls(path)
    except _Truncated as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({e})") from None
    except Exception as e:  # noqa: BLE001  (untrusted bytes through a third-party parser: any failure is the file's)
        raise CheckpointError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader, path: str | Path) -> dict[str, Any]:
    """Every key/value of the file as plain Python values."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:  # noqa: BLE001  (undecodable strings, odd types: the file's fault)
            raise CheckpointError(f"{path}: metadata {key}: unreadable ({type(e).__name__}: {e})") from None
    return meta


def _key(meta: dict, key: str, kind: type | tuple, path, default: Any = ...) -> Any:
    value = meta.get(key, default)
    if value is ...:
        raise CheckpointError(f"{path}: metadata {key} is missing")
    if value is not default and (not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float)):
        raise CheckpointError(f"{path}: metadata {key} = {value!r} is not a {getattr(kind, '__name__', kind)}")
    return value


def _f32(x: float) -> float:
    """The shortest decimal that a float32 value came from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


# -- config --------------------------------------------------------------------------------------
def hf_config(meta: dict, shapes: dict[str, tuple[int, ...]], path) -> dict[str, Any]:
    """config.json from the metadata; `shapes` (GGUF name -> HF-order shape) says what the file holds."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)}; Mistral files say llama)"
        )
    name = f"{meta.get('general.basename', '')} {meta.get('general.name', '')}".lower()
    hf_arch = "MistralForCausalLM" if arch == "llama" and "mistral" in name else ARCHITECTURES[arch]

    def k(key, kind=int, default=...):
        return _key(meta, f"{arch}.{key}", kind, path, default)

    heads = k("attention.head_count")
    kv = k("attention.head_count_kv", (int, list), heads)
    if isinstance(kv, list):  # per-layer counts; a uniform list is a plain model
        if not kv or len(set(kv)) != 1:
            raise CheckpointError(
                f"{path}: metadata {arch}.attention.head_count_kv varies by layer ({kv[:8]}...): not supported"
            )
        kv = kv[0]
    hidden = k("embedding_length")
    head_dim = k("attention.key_length", int, hidden // heads if heads else 0)
    if k("attention.value_length", int, head_dim) != head_dim:
        raise CheckpointError(f"{path}: metadata {arch}.attention.value_length differs from key_length: not supported")
    if k("rope.dimension_count", int, head_dim) != head_dim:
        raise CheckpointError(
            f"{path}: metadata {arch}.rope.dimension_count {k('rope.dimension_count')} is not the "
            f"head dimension {head_dim} (partial rotary embeddings are not supported)"
        )
    embed = shapes.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: no tensor token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = k("vocab_size", int, len(tokens) if isinstance(tokens, list) else embed[0])
    d = {
        "architectures": [hf_arch],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": k("feed_forward_length"),
        "num_hidden_layers": k("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(k("attention.layer_norm_rms_epsilon", float)),
        "rope_theta": _f32(k("rope.freq_base", float, 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch, path),
        "max_position_embeddings": k("context_length"),
        # llama.cpp writes no output projection when it is the embedding matrix
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": "blk.0.ffn_up.bias" in shapes,
    }
    for ours, theirs in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = _key(meta, f"tokenizer.ggml.{theirs}", int, path, None)
        if value is not None and 0 <= value < vocab:
            d[ours] = value
    if hf_arch == "MistralForCausalLM":
        d["sliding_window"] = None  # llama.cpp runs these with full attention
    return d


def llama3_rope(factors: np.ndarray, theta: float, head_dim: int, path) -> dict | None:
    """The llama3 rope_scaling behind llama.cpp's per-frequency factors (tensor rope_freqs.weight).

    llama.cpp's converter bakes Llama 3.1's four numbers into one divisor per frequency: 1 for short
    wavelengths, `factor` for long ones, and between them 1/r linear in 1/wavelength. That line fixes
    original_max_position_embeddings / (high - low) and low / (high - low); with low_freq_factor = 1
    (as every Llama 3.x has) it gives the other two. The answer is kept only if it reproduces every factor."""
    from yunque.model import ModelConfig, rope_inv_freq

    r = np.asarray(factors, dtype=np.float64).reshape(-1)
    if r.shape != (head_dim // 2,) or not np.isfinite(r).all() or (r <= 0).any():
        raise CheckpointError(f"{path}: tensor rope_freqs.weight: expected {head_dim // 2} positive factors")
    if np.allclose(r, 1.0):
        return None
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = _f32(r.max())
    mid = (r > 1 + 1e-6) & (r < factor * (1 - 1e-6))
    candidates = [(4.0, 8192)]  # Llama 3.1's, when too few factors lie between the two plateaus to fit a line
    if mid.sum() >= 2:
        smooth = (1 / r[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv[mid] / (2 * np.pi), smooth, 1)  # smooth = a / wavelength - b
        if intercept < 0:
            candidates.insert(0, (round(1 - 1 / intercept, 6), round(-slope / intercept)))
    for high, orig in candidates:
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": high,
            "original_max_position_embeddings": orig,
        }
        cfg = ModelConfig(hidden_size=head_dim, num_attention_heads=1, rope_theta=theta, rope_scaling=scaling)
        if np.allclose(inv / rope_inv_freq(cfg).double().numpy(), r, rtol=1e-4, atol=0):
            return scaling
    raise CheckpointError(
        f"{path}: tensor rope_freqs.weight holds per-frequency RoPE factors that no llama3 rope_scaling reproduces"
    )


def _rope_scaling(meta: dict, arch: str, path) -> dict | None:
    kind = _key(meta, f"{arch}.rope.scaling.type", str, path, None)
    factor = _key(meta, f"{arch}.rope.scaling.factor", (int, float), path, None)
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", _key(meta, f"{arch}.rope.scale_linear", (int, float), path)
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise CheckpointError(
            f"{path}: metadata {arch}.rope.scaling.type {kind!r} is not supported (supported: none, linear)"
        )
    if factor is None:
        raise CheckpointError(f"{path}: metadata {arch}.rope.scaling.factor is missing (needed by linear RoPE scaling)")
    return {"rope_type": "linear", "factor": _f32(factor)}


def _plan(reader, meta: dict, path) -> tuple[dict, list[tuple[str, Any]]]:
    """(config.json dict, [(HF name, reader tensor)]) after checking every tensor against the model."""
    from yunque.formats.hf import config_from_hf
    from yunque.model import Transformer

    gguf = _gguf()
    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(s) for s in reversed(t.shape.tolist())) for n, t in tensors.items()}
    d = hf_config(meta, shapes, path)
    if "rope_freqs.weight" in tensors:  # Llama 3.1-style scaling, as factors rather than config
        t = tensors.pop("rope_freqs.weight")
        if d["rope_scaling"] is not None:
            raise CheckpointError(f"{path}: both rope_freqs.weight and a rope.scaling.type: ambiguous RoPE scaling")
        d["rope_scaling"] = llama3_rope(
            gguf.quants.dequantize(t.data, t.tensor_type), d["rope_theta"], d["head_dim"], path
        )
    cfg = config_from_hf(d, src=f"{path}")
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in Transformer(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    plan = []
    for name, t in tensors.items():
        hf = hf_tensor_name(name)
        if hf is None or hf not in expected:
            what = (
                "has no Hugging Face counterpart"
                if hf is None
                else f"({hf}) is not part of this {d['architectures'][0]}"
            )
            raise CheckpointError(f"{path}: tensor {name} {what}")
        if shapes[name] != expected[hf]:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(shapes[name])}, the metadata needs {list(expected[hf])}"
            )
        kind = t.tensor_type.name
        if kind not in QUANT_TYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has type {kind}, which yunque cannot dequantise "
                f"(supported: {', '.join(QUANT_TYPES)})"
            )
        if (
            gguf.GGMLQuantizationType[kind] not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            and getattr(gguf.quants, kind, None) is None
        ):  # an older gguf package
            raise CheckpointError(
                f"{path}: tensor {name} has type {kind}; the installed gguf package cannot "
                "dequantise it (pip install -U gguf)"
            )
        plan.append((hf, t))
    missing = sorted(set(expected) - {hf for hf, _ in plan})
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return d, plan


def _pieces(t, cfg: dict, permute: bool):
    """A tensor as float32 arrays in HF's layout, a block of rows at a time (one block for q/k)."""
    gguf = _gguf()
    name = t.name
    if permute and (".attn_q." in name or ".attn_k." in name):
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        n = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
        yield permute_qk(w, n, to_gguf=False)
        return
    # Rows dequantise independently; blocks of them keep the float32 copies small (an embedding is the largest).
    step = len(t.data) if t.data.ndim == 1 else max(1, _BLOCK_ELEMENTS // max(1, int(t.n_elements) // len(t.data)))
    for i in range(0, len(t.data), step):
        yield gguf.quants.dequantize(t.data[i : i + step], t.tensor_type)


_BLOCK_ELEMENTS = 1 << 22


def _release(reader, t) -> None:
    """Drop the source tensor's pages from RSS: each is read once."""
    try:
        page = mmap.PAGESIZE
        start = t.data_offset // page * page
        reader.data._mmap.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
    except (AttributeError, OSError, ValueError):
        pass


# -- writing -------------------------------------------------------------------------------------
def _write_weights(path: Path, reader, plan: list, cfg: dict, dtype: torch.dtype, src) -> None:
    """model.safetensors written tensor by tensor (the safetensors library wants them all in memory)."""
    permute = cfg["architectures"][0] != "Qwen2ForCausalLM"
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for hf, t in sorted(plan, key=lambda x: x[0]):
        shape = [int(s) for s in reversed(t.shape.tolist())]
        n = int(np.prod(shape)) * dtype.itemsize
        header[hf] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned, as the safetensors library writes them
    by_name = dict(plan)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for hf in header:
            if hf == "__metadata__":
                continue
            t = by_name[hf]
            for piece in _pieces(t, cfg, permute):
                w = torch.from_numpy(np.require(piece, requirements=("C", "W")))
                if not bool(torch.isfinite(w).all()):
                    raise CheckpointError(f"{src}: tensor {t.name} holds NaN or infinite values (corrupt file)")
                f.write(w.to(dtype).contiguous().view(-1).view(torch.uint8).numpy().data)
            _release(reader, t)


def import_gguf(src: str | Path, out: str | Path, dtype: str | torch.dtype = "float32") -> Path:
    """Convert a GGUF file into a Hugging Face model directory `out` (written atomically).

    `out` must not exist, be empty, or hold an earlier import (which is then replaced)."""
    from yunque.data.manifest import sha256_file
    from yunque.formats.gguf_tokenizer import tokenizer_files

    _gguf()  # a missing package is named before anything else
    src, out = Path(src), Path(out)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / IMPORT_FILE).is_file()):
        raise CheckpointError(f"{out}: exists and is not an empty directory or an earlier import; pick another --out")
    reader = open_gguf(src)
    meta = read_metadata(reader, src)
    cfg, plan = _plan(reader, meta, src)
    files = tokenizer_files(meta, cfg, src)  # checked before anything is written
    from yunque.formats.hf import config_from_hf, config_to_hf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_weights(tmp / "model.safetensors", reader, plan, cfg, dtype, src)
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config_from_hf(cfg), dtype), indent=2) + "\n")
        for name, content in files.items():
            (tmp / name).write_text(content, encoding="utf-8")
        counts: dict[str, int] = {}
        for _, t in plan:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        provenance = {
            "format": "gguf",
            "source": str(src.resolve()),
            "sha256": sha256_file(src),
            "bytes": src.stat().st_size,
            "gguf": {
                "architecture": meta.get("general.architecture"),
                "name": meta.get("general.name"),
                "tensor_types": counts,
                "tokenizer": meta.get("tokenizer.ggml.model"),
                "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
            },
            "dtype": str(dtype).removeprefix("torch."),
            "yunque_version": _version(),
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / IMPORT_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _version() -> str:
    from yunque import __version__

    return __version__


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an earlier directory there is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
