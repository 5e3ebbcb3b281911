"""Hugging Face model directories: config.json <-> ModelConfig, safetensors <-> Transformer.

Our parameter names are Hugging Face's, so the weight mapping is the identity; the work
here is validating everything before a byte of weights is read, loading lean (tensor by
tensor into a model built on the meta device), and refusing pickle outright.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from yunque.errors import CheckpointError
from yunque.formats.model_limits import check_fits, checked
from yunque.formats.safetensors_io import SafetensorsFile
from yunque.model import ModelConfig, Transformer, rope_inv_freq
from yunque.untrusted import inside, read_json

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Keys we understand; anything else in config.json is carried through `extra` on save.
_KNOWN = set(_REQUIRED) | {
    "architectures",
    "model_type",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "torch_dtype",
    "dtype",
    "hidden_act",
    "transformers_version",
    "layer_types",
}
PICKLE_FILES = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _rope(d: dict, src: str) -> tuple[float, dict | None]:
    params = d.get("rope_parameters") or d.get("rope_scaling")  # transformers >= 5 writes rope_parameters
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    if params and not isinstance(params, dict):
        raise CheckpointError(f"{src}: {key}: expected an object or null, got {params!r:.100}")
    theta = d.get("rope_theta", (params or {}).get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < 1e300:
        raise CheckpointError(f"{src}: rope_theta: expected a positive number, got {theta!r:.100}")
    if not params:
        return float(theta), None
    kind = params.get("rope_type", params.get("type", "default"))
    if not isinstance(kind, str) or kind not in ROPE_TYPES:
        raise CheckpointError(f"{src}: {key}.rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    for f in ROPE_TYPES[kind]:
        if f not in params:
            raise CheckpointError(f"{src}: {key}.{f} is missing (needed by rope_type {kind!r})")
    if kind == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    return float(theta), scaling


def config_from_hf(d: dict[str, Any], src: str = "config.json") -> ModelConfig:
    if not isinstance(d, dict):
        raise CheckpointError(f"{src}: expected a JSON object, got {type(d).__name__}")
    archs = d.get("architectures")
    if not archs:
        raise CheckpointError(f"{src}: field 'architectures' is missing")
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise CheckpointError(f"{src}: architectures: expected a list of names, got {archs!r:.100}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{src}: architectures {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    for f in _REQUIRED:
        if f not in d:
            raise CheckpointError(f"{src}: field {f!r} is missing")
    if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
        raise CheckpointError(f"{src}: use_sliding_window=true is not supported for Qwen2")
    theta, scaling = _rope(d, src)
    window = d.get("sliding_window") if arch == "MistralForCausalLM" else None
    return checked(
        ModelConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=True if arch == "Qwen2ForCausalLM" else d.get("attention_bias", False),
            attention_out_bias=arch == "LlamaForCausalLM" and d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            sliding_window=window,
            architecture=arch,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            initializer_range=d.get("initializer_range", 0.02),
            extra={k: v for k, v in d.items() if k not in _KNOWN},
        ),
        src,
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    d: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": ARCHITECTURES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.architecture == "LlamaForCausalLM":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if cfg.architecture == "MistralForCausalLM":
        d["sliding_window"] = cfg.sliding_window
    if cfg.architecture == "Qwen2ForCausalLM":
        d["use_sliding_window"] = False
    return {**cfg.extra, **d}


def read_config(path: str | Path) -> ModelConfig:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found (a Hugging Face model directory needs config.json)")
    return config_from_hf(read_json(cfg_path, CheckpointError), str(cfg_path))


def weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from the shard index or the single model.safetensors; refuses pickle."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        wmap = read_json(index, CheckpointError)
        wmap = wmap.get("weight_map") if isinstance(wmap, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f'{index}: invalid shard index (expected "weight_map": {{tensor name: file name}})')
        shards = {shard: inside(path, shard, index, CheckpointError) for shard in sorted(set(wmap.values()))}
        for _shard, p in shards.items():
            if not p.is_file():
                raise CheckpointError(f"{p}: shard listed in {index.name} is missing")
        return {name: shards[shard] for name, shard in wmap.items()}
    single = path / "model.safetensors"
    if single.is_file():
        inside(path, single.name, path, CheckpointError)  # a symlink to elsewhere is refused, not followed
        with SafetensorsFile(single) as f:
            return {name: single for name in f.keys()}
    pickles = sorted({q.name for pat in PICKLE_FILES for q in path.glob(pat)})
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle weights found ({', '.join(pickles)}). yunque never unpickles files, which can run "
            "arbitrary code. Convert them once, in a sandbox you trust, with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers old checkpoints saved; we recompute them


def load_model(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", quantized: bool = False
) -> Transformer:
    """Load an HF directory into a Transformer; dtype defaults to the checkpoint's own.

    A directory `yunque quantize` wrote loads only with `quantized=True` (inference): its
    int8/int4 codes and scales keep their stored dtypes, `dtype` sets the rest.
    """
    path = Path(path)
    cfg = read_config(path)
    dev = torch.device(device)
    itemsize = (dtype or checkpoint_dtype(path) or torch.float32).itemsize
    check_fits(
        cfg,
        itemsize,
        str(path / "config.json"),
        what=f"its weights ({itemsize} bytes each)",
        memory=torch.cuda.get_device_properties(dev).total_memory
        if dev.type == "cuda" and torch.cuda.is_available()
        else None,
    )
    qc = None
    if "quantization_config" in cfg.extra:
        from yunque import quantize

        qc = quantize.config_of(cfg.extra, str(path / "config.json"))
        if not quantized:
            raise CheckpointError(
                f"{path}: quantised for inference (int{qc.bits}); it loads in generate, chat, eval and serve. "
                "Training, merging, quantising and exporting need the full-precision model it was quantised from"
            )
    files = weight_files(path)
    kept: set[str] = set()  # quantised tensors: read in their stored dtype
    with torch.device("meta"):
        model = Transformer(cfg)
        if qc is not None:
            kept = quantize.quantized_layout_(model, qc)
    expected = {k: v for k, v in model.state_dict().items()}
    tied = [k for k in expected if k.startswith("lm_head.")] if cfg.tie_word_embeddings else []
    for k in tied:
        expected.pop(k)
    state: dict[str, torch.Tensor] = {}
    unexpected = [
        n
        for n in files
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    if unexpected:
        raise CheckpointError(
            f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    missing = [n for n in expected if n not in files]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for fpath, names in by_file.items():
        with SafetensorsFile(fpath) as f:
            for name in names:
                want = tuple(expected[name].shape)
                if f.shape(name) != want:
                    raise CheckpointError(
                        f"{fpath}: tensor {name} has shape {list(f.shape(name))}, the config needs {list(want)}"
                    )
                if name in kept and f.entries[name][0] != expected[name].dtype:
                    raise CheckpointError(
                        f"{fpath}: tensor {name} is {f.entries[name][0]}, quantization_config "
                        f"needs {expected[name].dtype}"
                    )
            for name in names:
                target = f.entries[name][0] if name in kept else (dtype or f.entries[name][0])
                out = torch.empty(expected[name].shape, dtype=target, device="cpu")
                state[name] = f.read(name, out=out).to(device)
    for k in tied:
        state[k] = state["model.embed_tokens." + k.removeprefix("lm_head.")]
    model.load_state_dict(state, assign=True, strict=True)
    if "lm_head.weight" in tied:  # one Parameter, as Transformer() ties them (a quantised pair shares codes)
        model.lm_head.weight = model.model.embed_tokens.weight
    if qc is not None:
        quantize.set_dtype_(model, model.model.norm.weight.dtype)  # what the float tensors were read as
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


Named = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def first_nonfinite(tensors: Named) -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first floating-point tensor holding NaN or Inf, or None.

    One float32 sum per tensor finds them (NaN and Inf survive a sum), without a copy; only a
    sum that overflowed is then checked element by element."""
    for name, t in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if not t.is_floating_point() or bool(torch.isfinite(t.detach().sum(dtype=torch.float32))):
            continue
        bad = int((~torch.isfinite(t.detach())).sum())
        if bad:
            return name, bad, t.numel()
    return None


def check_finite(tensors: Named, where: str, hint: str = "the weights are corrupt or their training diverged") -> None:
    """The one check that loaders and writers share: weights holding NaN or Inf answer every
    request with garbage or an error, so they are refused, naming the tensor."""
    found = first_nonfinite(tensors)
    if found is not None:
        name, bad, n = found
        raise CheckpointError(f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN or Inf) of {n}; {hint}")


def save_model(
    model: Transformer,
    out: str | Path,
    max_shard_bytes: int = 5 * 1024**3,
    generation_config: dict[str, Any] | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Write config.json, safetensors (sharded past `max_shard_bytes`) and generation_config.json.

    Written into a temporary sibling directory and renamed, so a crash never leaves a
    half-written model where a complete one is expected. Weights holding NaN or Inf are
    refused (naming the tensor, nothing written) unless `allow_nonfinite`.
    """
    from safetensors.torch import save_file

    out = Path(out)
    cfg = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if not allow_nonfinite:
        check_finite(state, f"{out}: not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    # The first float tensor, not a quantised model's codes or scales (yunque.quantize).
    dtype = next(v.dtype for k, v in state.items() if v.is_floating_point() and not k.endswith("_scale"))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for name, shard in zip(names, shards):
            save_file(shard, tmp / name, metadata={"format": "pt"})
        if n > 1:
            index = {
                "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                "weight_map": {k: names[i] for i, s in enumerate(shards) for k in s},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **(generation_config or {})}
        if cfg.pad_token_id is not None:
            gen["pad_token_id"] = cfg.pad_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if out.exists():
            # Keep files we do not own (tokenizer, README) and replace only the model's own.
            for f in out.iterdir():
                if (
                    f.name.startswith("model")
                    and f.suffix in (".safetensors", ".json")
                    or f.name in ("config.json", "generation_config.json")
                ):
                    f.unlink()
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def with_stop_ids(gen: dict[str, Any] | None, tokenizer_dir: Path) -> dict[str, Any] | None:
    """A generation_config.json for a model directory holding the tokenizer in `tokenizer_dir`: `gen`
    (the source model's, or None) with every stop id of that tokenizer as `eos_token_id` (EOS, the
    chat template's end of turn, the source's eos ids), so transformers and vLLM stop at the end
    of a turn too. `gen` unchanged when there is no tokenizer yunque can read."""
    from yunque.errors import YunqueError
    from yunque.tokenizer import Tokenizer

    if not (tokenizer_dir / "tokenizer.json").is_file():
        return gen
    try:
        tok = Tokenizer.from_dir(tokenizer_dir)
    except YunqueError:
        return gen
    return {**(gen or {}), **{k: v for k, v in tok.generation_config().items() if v not in (None, [])}}


_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype config.json declares (`torch_dtype`, or `dtype` as transformers >= 5 writes it)."""
    d = read_json(Path(path) / "config.json", CheckpointError)
    name = (d.get("torch_dtype") or d.get("dtype")) if isinstance(d, dict) else None
    return _DTYPE_NAMES.get(name) if isinstance(name, str) else None
