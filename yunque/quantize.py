"""Weight-only int8 / int4 quantisation of a model for inference (`yunque quantize`).

Not QLoRA's NF4 (`yunque/quant.py`, a frozen base to train adapters on): these weights are
for generate, chat, eval and serve only. A quantised directory describes itself in
config.json, in the spirit of Hugging Face's `quantization_config`:

    "quantization_config": {"quant_method": "yunque", "bits": 4, "group_size": 32, "sym": true,
                            "modules_to_not_convert": ["lm_head", "model.embed_tokens"]}

and holds, for each quantised module X (every linear of the decoder layers; the embedding
and the head as options), in place of X.weight:

    X.qweight            bits 8: int8 (out, in), codes -127..127
                         bits 4: uint8 (out, in/2), codes 0..15, column 2j in the low nibble, 2j+1 in the high
    X.weight_scale       bits 8: float32 (out, 1), one per output channel
                         bits 4: float16 (out, in/group_size)
    X.weight_zero_point  bits 4 and sym false only: uint8 (out, in/group_size), 0..15

    weight = (code - zero_point) * scale    (zero point 0 for int8, 8 for symmetric int4)

The embedding is quantised per row, which is per output channel of a tied head, so a tied
model stores its one matrix once. To decode on CPU the linears run PyTorch's packed kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`; see QuantLinear); prefill and other
devices dequantise and multiply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from yunque.errors import CheckpointError, ConfigError

QUANT_METHOD = "yunque"
GROUP_SIZES = (32, 64, 128)
OPTIONAL = ("lm_head", "model.embed_tokens")  # kept in full precision unless asked for
TENSORS = ("qweight", "weight_scale", "weight_zero_point")
KERNEL_MAX_ROWS = 128  # rows of activations up to which the packed CPU kernels beat dequantise + GEMM


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 8
    group_size: int = -1  # -1: one scale per output channel (int8)
    sym: bool = True
    modules_to_not_convert: tuple[str, ...] = OPTIONAL

    def __post_init__(self):
        if self.bits == 8 and (self.group_size != -1 or not self.sym):
            raise ConfigError(
                "int8 is symmetric with one scale per output channel: --group-size and --asymmetric apply to --bits 4"
            )
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ConfigError(
                f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} for --bits 4, got {self.group_size}"
            )
        if self.bits not in (8, 4):
            raise ConfigError(f"--bits must be 8 or 4, got {self.bits}")
        if not set(self.modules_to_not_convert) <= set(OPTIONAL):
            raise ConfigError(f"modules_to_not_convert may name only {', '.join(OPTIONAL)}")

    def to_hf(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }

    @classmethod
    def from_hf(cls, d: Any, src: str) -> QuantConfig:
        """Strict: config.json is untrusted, and a misread layout would give garbage weights silently."""
        where = f"{src}: quantization_config"
        if not isinstance(d, dict):
            raise CheckpointError(f"{where} must be an object")
        if d.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(
                f"{where}.quant_method {d.get('quant_method')!r} is not supported "
                f"(yunque reads its own, {QUANT_METHOD!r}; others are loaded by their own tools)"
            )
        known = {"quant_method", "bits", "group_size", "sym", "modules_to_not_convert"}
        extra = sorted(set(d) - known)
        if extra:
            raise CheckpointError(f"{where}.{extra[0]} is not a known field (known: {', '.join(sorted(known))})")
        for key, typ in (("bits", int), ("group_size", int), ("sym", bool)):
            if key not in d or type(d[key]) is not typ:
                raise CheckpointError(f"{where}.{key} must be {'a boolean' if typ is bool else 'an integer'}")
        skip = d.get("modules_to_not_convert", [])
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise CheckpointError(f"{where}.modules_to_not_convert must be a list of module names")
        try:
            return cls(d["bits"], d["group_size"], d["sym"], tuple(skip))
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from None


def config_of(extra: dict[str, Any], src: str) -> QuantConfig | None:
    """The QuantConfig of a model whose config.json had a `quantization_config` (kept in ModelConfig.extra)."""
    d = extra.get("quantization_config")
    return None if d is None else QuantConfig.from_hf(d, src)


# ---------------------------------------------------------------- weights <-> codes


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) uint8 codes 0..15 -> (..., K/2): column 2j in the low nibble, 2j+1 in the high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), -1).flatten(-2)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, qc: QuantConfig) -> dict[str, torch.Tensor]:
    """(out, in) float weight -> {"qweight", "weight_scale"[, "weight_zero_point"]} (module docstring)."""
    w = w.detach().float()
    N, K = w.shape
    if qc.bits == 8:
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = (w / scale).round().clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "weight_scale": scale}
    G = qc.group_size
    wg = w.view(N, K // G, G)
    if qc.sym:
        # llama.cpp's q4_0: the largest magnitude maps to -8 exactly, so all 16 levels are used.
        big = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scale = (big / -8).to(torch.float16)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = (wg / scale.float()[..., None]).round().clamp(-8, 7) + 8
        return {"qweight": pack_int4(codes.to(torch.uint8).view(N, K)), "weight_scale": scale}
    # Zero stays exactly representable (a zero point is an integer code): the range includes 0.
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = (-lo / scale.float()).round().clamp(0, 15)
    codes = ((wg / scale.float()[..., None]).round() + zero[..., None]).clamp(0, 15)
    return {
        "qweight": pack_int4(codes.to(torch.uint8).view(N, K)),
        "weight_scale": scale,
        "weight_zero_point": zero.to(torch.uint8),
    }


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Codes of any leading shape (..., rows, K or K/2) back to (..., rows, K) weights in `dtype`.

    Computed in `dtype`: codes and code - zero are small integers, exact in any float type, so the
    one rounding is the product's, as in the kernels.
    """
    if bits == 8:
        return qweight.to(dtype) * scale.to(dtype)
    codes = unpack_int4(qweight).to(dtype).unflatten(-1, (scale.shape[-1], -1))
    z = zero.to(dtype)[..., None] if zero is not None else 8
    return ((codes - z) * scale.to(dtype)[..., None]).flatten(-2)


# ---------------------------------------------------------------- modules


class _Quantized(nn.Module):
    """Buffers shared by the quantised linear and embedding (module docstring); `dtype`: the output's."""

    def __init__(self, rows: int, cols: int, qc: QuantConfig, dtype: torch.dtype):
        super().__init__()
        if qc.bits == 4 and cols % qc.group_size:
            raise ConfigError(f"--group-size {qc.group_size} does not divide {cols} input features")
        self.bits, self.group_size, self.sym, self.dtype = qc.bits, qc.group_size, qc.sym, dtype
        n_groups = 1 if qc.bits == 8 else cols // qc.group_size
        self.register_buffer(
            "qweight",
            torch.empty(rows, cols if qc.bits == 8 else cols // 2, dtype=torch.int8 if qc.bits == 8 else torch.uint8),
        )
        self.register_buffer(
            "weight_scale", torch.empty(rows, n_groups, dtype=torch.float32 if qc.bits == 8 else torch.float16)
        )
        zero = None if qc.sym else torch.empty(rows, n_groups, dtype=torch.uint8)
        self.register_buffer("weight_zero_point", zero)

    def _assign(self, q: dict[str, torch.Tensor]) -> None:
        for k, v in q.items():
            setattr(self, k, v)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.weight_scale, self.weight_zero_point, self.bits, dtype or self.dtype)


class QuantLinear(_Quantized):
    """An inference-only linear over int8 / int4 weights.

    On CPU, up to KERNEL_MAX_ROWS rows (decode, short prefills) run PyTorch's packed kernels on bf16
    activations: on x86 they are vectorised for bf16 only (fp32 and fp16 run a scalar loop, 3-30x
    slower than the float linear), so other activations are rounded to bf16 for them and the result
    cast back. The kernels' 4x4 tiles read the weight once per 4 rows, so past that, on other devices
    and where the int4 kernel does not apply (out_features not a multiple of 16), the weight is
    dequantised for one GEMM (bench/NOTES.md, "Inference quantisation").
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qc: QuantConfig,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(out_features, in_features, qc, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._kernel: tuple[torch.Tensor, torch.Tensor] | None = None  # the CPU kernel's weight and scales
        self._kernel_fits = qc.bits == 8 or out_features % 16 == 0  # the int4 layout's blocks of 16 rows

    def _apply(self, fn, recurse=True):
        self._kernel = None  # made again from the moved buffers
        return super()._apply(fn, recurse)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qc: QuantConfig) -> QuantLinear:
        w = linear.weight
        with torch.device("meta"):
            m = cls(linear.in_features, linear.out_features, qc, linear.bias is not None, w.dtype)
        m._assign({k: v.to(w.device) for k, v in quantize_weight(w, qc).items()})
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def _kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kernel is None:
            if self.bits == 8:
                self._kernel = (self.qweight, self.weight_scale.view(-1).to(torch.bfloat16))
            else:
                # Its own layout (CPU-specific), and (code - 8) * scale + zero, zero in the weights' units.
                codes = unpack_int4(self.qweight).to(torch.int32)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                s, zp = self.weight_scale.float(), self.weight_zero_point
                z = (8 - zp.float()) * s if zp is not None else torch.zeros_like(s)
                self._kernel = (packed, torch.stack((s, z), -1).transpose(0, 1).contiguous().to(torch.bfloat16))
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if x.device.type == "cpu" and 0 < rows <= KERNEL_MAX_ROWS and self._kernel_fits and x.is_floating_point():
            w, s = self._kernel_operands()
            xb = x2.to(torch.bfloat16).contiguous()
            if self.bits == 8:
                y = torch.ops.aten._weight_int8pack_mm(xb, w, s)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, self.group_size, s)
            y = y.to(x.dtype)
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int{self.bits} {g}{'' if self.sym else ' asymmetric'}"
        )


class QuantEmbedding(_Quantized):
    """An embedding table stored as int8 / int4 rows, dequantised as they are looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qc: QuantConfig, dtype: torch.dtype = torch.float32):
        super().__init__(num_embeddings, embedding_dim, qc, dtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, qc: QuantConfig) -> QuantEmbedding:
        w = emb.weight
        with torch.device("meta"):
            m = cls(emb.num_embeddings, emb.embedding_dim, qc, w.dtype)
        m._assign({k: v.to(w.device) for k, v in quantize_weight(w, qc).items()})
        return m

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the output dtype and device: what callers read a model's dtype and
        device from (`model.model.embed_tokens.weight`: KV caches, inputs)."""
        return torch.empty(0, dtype=self.dtype, device=self.qweight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        z = self.weight_zero_point[ids] if self.weight_zero_point is not None else None
        return dequantize(self.qweight[ids], self.weight_scale[ids], z, self.bits, self.dtype)

    def extra_repr(self) -> str:
        g = "per row" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} {g}{'' if self.sym else ' asymmetric'}"


# ---------------------------------------------------------------- whole models


def _targets(model: nn.Module, qc: QuantConfig) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    for opt in OPTIONAL:
        if opt not in qc.modules_to_not_convert:
            names.append(opt)
    if model.config.tie_word_embeddings and len(set(OPTIONAL) & set(qc.modules_to_not_convert)) == 1:
        raise ConfigError(
            "this model ties lm_head to embed_tokens (one matrix): quantise both "
            "(--include-embedding --include-head) or neither"
        )
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_model_(model: nn.Module, qc: QuantConfig) -> list[str]:
    """Replace the decoder's linears (and the embedding / head if asked) by quantised ones, in place;
    records `qc` in the model's config so `save_model` writes a self-describing directory. Returns the names."""
    names = _targets(model, qc)
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, nn.Embedding):
            new = QuantEmbedding.from_embedding(m, qc)
        elif name == "lm_head" and model.config.tie_word_embeddings:
            new = None  # made from the (already quantised) embedding below
        else:
            try:
                new = QuantLinear.from_linear(m, qc)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
        if new is not None:
            _set(model, name, new)
    if "lm_head" in names and model.config.tie_word_embeddings:
        _set(model, "lm_head", tied_head(model))
    model.config = dataclasses.replace(model.config, extra={**model.config.extra, "quantization_config": qc.to_hf()})
    return names


def tied_head(model: nn.Module) -> QuantLinear:
    """The output head over the quantised embedding's own codes and scales (one matrix, stored once)."""
    emb = model.model.embed_tokens
    qc = QuantConfig(emb.bits, emb.group_size, emb.sym, ())
    with torch.device("meta"):
        head = QuantLinear(emb.embedding_dim, emb.num_embeddings, qc, False, emb.dtype)
    head._assign({k: getattr(emb, k) for k in TENSORS if getattr(emb, k) is not None})
    return head


def quantized_layout_(model: nn.Module, qc: QuantConfig) -> set[str]:
    """On a meta-device model: swap in empty quantised modules so its state_dict names (and shapes and
    dtypes) are a quantised directory's. Returns the quantised tensors' names (they keep their dtypes)."""
    names = _targets(model, qc)
    tensors = set()
    for name in names:
        m = model.get_submodule(name)
        try:
            if isinstance(m, nn.Embedding):
                new = QuantEmbedding(m.num_embeddings, m.embedding_dim, qc)
            else:
                new = QuantLinear(m.in_features, m.out_features, qc, m.bias is not None)
        except ConfigError as e:
            raise CheckpointError(f"quantization_config: {name}: {e}") from None
        _set(model, name, new)
        tensors |= {f"{name}.{k}" for k in TENSORS if getattr(new, k) is not None}
    return tensors


def set_dtype_(model: nn.Module, dtype: torch.dtype) -> None:
    """The float dtype the quantised modules compute in (the embedding's output, dequantised weights)."""
    for m in model.modules():
        if isinstance(m, _Quantized):
            m.dtype = dtype


def storage_bits(model: nn.Module) -> float:
    """Bits per quantised weight: codes, scales and zero points (each shared matrix counted once)."""
    seen, nbytes, numel = set(), 0, 0
    for m in model.modules():
        if isinstance(m, _Quantized) and id(m.qweight) not in seen:
            seen.add(id(m.qweight))
            nbytes += sum(
                t.numel() * t.element_size() for t in (m.qweight, m.weight_scale, m.weight_zero_point) if t is not None
            )
            numel += m.weight_scale.shape[0] * (m.qweight.shape[1] * (1 if m.bits == 8 else 2))
    return 8 * nbytes / numel
