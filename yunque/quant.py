"""4-bit NF4 storage for a frozen base (QLoRA), on CPU and CUDA.

The NF4 kernels come from bitsandbytes (`quantize_4bit` / `dequantize_4bit`): a QLoRA step
dequantises every base weight twice, bitsandbytes does it far faster on CPU than torchao, and its
codes and absmax layout are the ones peft/transformers QLoRA use (bench/NOTES.md).

Layout (bitsandbytes'): weights are flattened, cut into blocks of `block_size`, each block
scaled by its absmax into [-1, 1] and rounded to the nearest of the 16 NF4 levels, two codes
per byte. With `double_quant` the fp32 absmax values are themselves quantised to 8 bits in
blocks of 256 (after subtracting their mean), saving ~0.36 bits/param.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from yunque.errors import ConfigError

BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_NESTED_BLOCK = 256  # bitsandbytes' block for the second-level (absmax) quantisation


def _bnb_functional():
    try:
        # bitsandbytes logs about optional CUDA/`kernels` extras it does not find; not our users' concern.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise ConfigError(
            "quantize_base (QLoRA) needs bitsandbytes: pip install 'yunque[qlora]' (or bitsandbytes); "
            "`yunque merge --original-base` merges a QLoRA adapter without it"
        ) from None
    return bnbf


def _check_device(device: torch.device) -> None:
    # bitsandbytes dispatches through torch.ops; a device without a registered kernel
    # (e.g. CUDA with a bitsandbytes build lacking that CUDA version) would fail deep inside.
    _bnb_functional()
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"quantize_base: NF4 storage runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("quantize_base: a CUDA tensor was given but CUDA is not available")


_CODE_BOOKS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _code_book(name: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' constant level tables (16 NF4 levels; 256-entry dynamic map for the scales),
    one copy per device rather than one per layer."""
    key = (name, device)
    if key not in _CODE_BOOKS:
        bnbf = _bnb_functional()
        table = bnbf.get_4bit_type("nf4", device=device) if name == "nf4" else bnbf.create_dynamic_map()
        _CODE_BOOKS[key] = table.to(device=device, dtype=torch.float32)
    return _CODE_BOOKS[key]


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W^T with W dequantised on the fly; backward re-dequantises instead of keeping
    a full-precision copy of W alive for every layer until backward (QLoRA's memory win)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: NF4Linear) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.module, ctx.x_dtype = module, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), module.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.module.dequantize(grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None


class NF4Linear(nn.Module):
    """A frozen `nn.Linear` whose weight is stored in NF4; `dequantize()` restores the original dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int = 64,
        double_quant: bool = False,
        dtype: torch.dtype = torch.float32,
        bias: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size: must be one of {BLOCK_SIZES}, got {block_size}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant, self.orig_dtype = block_size, double_quant, dtype
        n = in_features * out_features
        n_blocks = -(-n // block_size)
        kw = dict(device=device)
        self.register_buffer("weight_nf4", torch.zeros(-(-n // 2), 1, dtype=torch.uint8, **kw))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, **kw))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, **kw))
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // _NESTED_BLOCK), dtype=torch.float32, **kw))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = False) -> NF4Linear:
        w = linear.weight
        _check_device(w.device)
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"quantize_base: cannot quantise a {w.dtype} weight to NF4")
        bnbf = _bnb_functional()
        packed, state = bnbf.quantize_4bit(
            w.detach().contiguous(), blocksize=block_size, quant_type="nf4", compress_statistics=double_quant
        )
        with torch.device("meta"):
            m = cls(linear.in_features, linear.out_features, block_size, double_quant, w.dtype, linear.bias is not None)
        m.weight_nf4 = packed
        m.absmax = state.absmax
        if double_quant:
            m.absmax_offset = state.offset.float().reshape(())
            m.absmax_scale = state.state2.absmax.float()
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def _state(self, dtype: torch.dtype):
        bnbf = _bnb_functional()
        nested = offset = None
        if self.double_quant:
            nested = bnbf.QuantState(
                absmax=self.absmax_scale,
                code=_code_book("dynamic", self.absmax.device),
                blocksize=_NESTED_BLOCK,
                dtype=torch.float32,
            )
            offset = self.absmax_offset
        return bnbf.QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=_code_book("nf4", self.absmax.device),
            blocksize=self.block_size,
            quant_type="nf4",
            dtype=dtype,
            offset=offset,
            state2=nested,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: the dtype it was quantised from)."""
        bnbf = _bnb_functional()
        return bnbf.dequantize_4bit(self.weight_nf4, self._state(dtype or self.orig_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear in the original dtype (frozen, like this module)."""
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        """Bytes holding the weight: 4-bit codes and block scales (bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}, dtype={self.orig_dtype}"
        )


def quantize_linears_(
    model: nn.Module, block_size: int = 64, double_quant: bool = False, skip: tuple[str, ...] = ("lm_head",)
) -> list[str]:
    """Replace every nn.Linear (except `skip` names and weights tied to other modules) by an NF4Linear.

    Returns the replaced module names. The full-precision weight is released as each module is
    replaced, so peak memory grows by one layer, not by a model.
    """
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    done = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name.split(".")[-1] in skip or counts[id(mod.weight)] > 1:
            continue
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model,
            child,
            NF4Linear.from_linear(mod, block_size, double_quant),
        )
        done.append(name)
    return done


def bits_per_param(model: nn.Module) -> float:
    """Measured storage of all NF4 weights in the model, in bits per weight element."""
    mods = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if not mods:
        raise ValueError("no NF4Linear in the model")
    return 8 * sum(m.storage_bytes() for m in mods) / sum(m.weight_numel for m in mods)
