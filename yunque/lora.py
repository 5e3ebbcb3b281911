"""LoRA and QLoRA: low-rank adapters wrapped around a built model's `nn.Linear` layers.

The model file knows nothing of LoRA. `apply_lora` swaps the target linears for `LoRALinear`
in place, freezes everything else and, for QLoRA, first stores the frozen linears in NF4
(`yunque.quant`). Adapter tensors are named `<module>.lora_A.weight` / `.lora_B.weight`,
PEFT's names without its `base_model.model.` prefix, so export is a rename.

    y = base(x) + scale * B(A(dropout(x)))      scale = alpha / r   (rsLoRA: alpha / sqrt(r))

A is kaiming-uniform and B zero, as in PEFT, so a fresh adapter leaves the model unchanged.
Adapter weights stay fp32 whatever the base dtype (PEFT does the same) so the optimizer
updates full-precision values; they are cast to the activation dtype in forward.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from yunque.errors import CheckpointError, ConfigError
from yunque.quant import BLOCK_SIZES, NF4Linear, quantize_linears_

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's formula)."""
    return alpha / (math.sqrt(r) if use_rslora else r)


@dataclass
class LoraConfig:
    """An adapter's settings: the library's, the `lora:` section of a training config, and a PEFT file's.

    Names follow PEFT's `LoraConfig` (`r`, `target_modules`, `use_rslora`) except `alpha` and
    `dropout` (PEFT's `lora_alpha`, `lora_dropout`; the prefix is the section name here).
    Defaults are PEFT's where it has one (dropout 0, no rsLoRA, no double quantisation).
    """

    r: int = field(default=16, metadata={"gt": 0})
    alpha: float = field(default=32.0, metadata={"gt": 0})
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    # A module is a target when its name equals an entry or ends with "." + entry (PEFT's rule).
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False  # scale = alpha / sqrt(r): keeps update size stable as r grows
    quantize_base: bool = False  # QLoRA: frozen linears (all but lm_head) stored in NF4; training sets it from `method`
    double_quant: bool = False  # with quantize_base: quantise the NF4 absmax scales too (~0.36 bits/param less)
    block_size: int = 64  # NF4 block: one absmax per this many weights

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from yunque.config import _check_range  # the same range rules load_config applies

        for f in dataclasses.fields(self):
            _check_range(getattr(self, f.name), f.metadata, f.name)
        if not self.target_modules:
            raise ConfigError("target_modules: must name at least one module")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size: must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.use_rslora)


class LoRADropout(nn.Module):
    """Dropout on the adapter's input: zero each element with probability p, scale the rest by 1/(1-p).

    On CPU the mask comes from 16-bit random integers drawn by numpy's PCG64, seeded from torch's
    generator (so `torch.manual_seed` and an exact resume still fix every mask), and p is rounded to
    a multiple of 2^-16. PyTorch's CPU `bernoulli_` costs more than the base layer's matmul at a
    LoRA layer's shapes: 4.5 ms against 4.4 for q_proj's 1024 x 576 x 576 on 2 cores, 11% of a
    SmolLM2 LoRA step (bench/NOTES.md, "LoRA dropout on CPU"). Other devices use `F.dropout`.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._cut = round(p * 65536) - 32768  # keep where a uniform int16 >= cut: P(keep) = 1 - p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        bits = np.random.Generator(np.random.PCG64(seed)).integers(-32768, 32768, size=x.shape, dtype=np.int16)
        # where() saves the bool mask for backward (1 byte per element), not a float copy of it
        return torch.where(torch.from_numpy(bits) >= self._cut, x * (1.0 / (1.0 - self.p)), 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class LoRALinear(nn.Module):
    """`base` (frozen nn.Linear or NF4Linear) plus a trainable rank-r update."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.scale = lora_scale(alpha, r, use_rslora)
        device = base.weight_nf4.device if isinstance(base, NF4Linear) else base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        # dropout 0 must cost nothing: no module call, no mask, no copy of x.
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = x if self.lora_dropout is None else self.lora_dropout(x)
        a = F.linear(h, self.lora_A.weight.to(h.dtype))  # (..., r)
        # y + scale * a @ B^T as one addmm: no separate scale, add, or (..., out) temporary.
        out = torch.addmm(
            y.reshape(-1, self.out_features),
            a.reshape(-1, self.r),
            self.lora_B.weight.to(a.dtype).t(),
            alpha=self.scale,
        )
        return out.view(y.shape)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """base weight + scale * B @ A, in the base's original dtype (an NF4 base is dequantised first)."""
        w = self.base.dequantize() if isinstance(self.base, NF4Linear) else self.base.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
        return (w.float() + delta).to(w.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def find_targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the linear modules `targets` select; every entry must select at least one."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]
    for t in targets:
        if not any(_matches(n, t) for n in linears):
            others = [n for n, m in model.named_modules() if _matches(n, t)]
            why = (
                f"{others[0]} is a {type(model.get_submodule(others[0])).__name__}, not nn.Linear"
                if others
                else "no such module"
            )
            kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(
                f"target_modules: {t!r} selects no linear layer ({why}; linear layers: {', '.join(kinds)})"
            )
    return [n for n in linears if any(_matches(n, t) for t in targets)]


def apply_lora(
    model: nn.Module, cfg: LoraConfig, names: list[str] | None = None, generator: torch.Generator | None = None
) -> list[str]:
    """Wrap the target linears in place, freeze all other parameters; returns the wrapped names.

    `names` wraps exactly these modules instead of those `cfg.target_modules` selects (used when
    loading an adapter that covers only some layers). With `cfg.quantize_base`, every frozen
    linear except lm_head (and weights tied to the embedding) is first stored in NF4.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("model already has LoRA adapters; merge them (merge_lora) or start from a fresh model")
    if cfg.double_quant and not cfg.quantize_base:
        raise ConfigError("double_quant: only applies with quantize_base: true")
    if names is None:
        names = find_targets(model, cfg.target_modules)
    else:
        for n in names:
            try:
                mod = model.get_submodule(n)
            except AttributeError:
                raise ConfigError(f"LoRA target {n}: the model has no such module") from None
            if not isinstance(mod, (nn.Linear, NF4Linear)):
                raise ConfigError(f"LoRA target {n}: is a {type(mod).__name__}, not nn.Linear")
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.quantize_base:
        quantize_linears_(model, cfg.block_size, cfg.double_quant)
    for n in names:
        _set_module(
            model,
            n,
            LoRALinear(model.get_submodule(n), cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, generator=generator),
        )
    return list(names)


@torch.no_grad()
def store_frozen_linears_(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen `nn.Linear` (LoRA bases, a frozen head) in `dtype`; returns how many.

    Under bf16 autocast a linear runs on a bf16 copy of its weight: for a frozen weight that
    copy is made on every forward and kept for backward. Storing the bf16 values once gives
    bit-identical results without the per-step cast and its memory, and halves the base.
    A head tied to the embedding is left alone (the embedding itself runs in fp32).
    """
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = embed.weight if embed is not None else None
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and not m.weight.requires_grad and m.weight is not tied and m.weight.dtype != dtype:
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
            n += 1
    return n


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: `<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r)."""
    sd = {}
    for n, m in lora_modules(model).items():
        sd[f"{n}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{n}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors into the model's LoRA modules; every tensor must match exactly."""
    expected = lora_state_dict(model)
    if not expected:
        raise CheckpointError(f"{source}: the model has no LoRA modules to load into (call apply_lora first)")
    for k in sd:
        if k not in expected:
            raise CheckpointError(f"{source}: tensor {k} matches no LoRA module of the model")
    for k, t in expected.items():
        if k not in sd:
            raise CheckpointError(f"{source}: tensor {k} is missing")
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{source}: tensor {k} has shape {list(sd[k].shape)}, the model needs {list(t.shape)}"
            )
        if not sd[k].is_floating_point():
            raise CheckpointError(f"{source}: tensor {k} has dtype {sd[k].dtype}, expected a float tensor")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(sd[k])


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and unwrap back to nn.Linear; NF4 bases (also those
    without an adapter) are dequantised to their original dtype. Returns the merged module names."""
    merged = []
    for n, m in lora_modules(model).items():
        base = m.base
        lin = base.to_linear() if isinstance(base, NF4Linear) else base
        lin.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        _set_module(model, n, lin)
        merged.append(n)
    for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        _set_module(model, n, m.to_linear())
    return merged


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; NF4 weights count as the parameters they stand for."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params) + sum(m.weight_numel for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total
