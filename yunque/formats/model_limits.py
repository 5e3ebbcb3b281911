"""What a model shape costs, known before anything is allocated: field checks, parameter count, memory fit.

A config.json comes from anywhere. `num_hidden_layers: 1000000` would build modules for minutes
while memory climbs, `hidden_size: 1e9` would fail deep inside torch, `num_attention_heads: 0`
would divide by zero. Here each is one message naming the file and the field, and a model too
large for this machine is refused with the memory it would need, before the first tensor exists.
"""

from __future__ import annotations

import dataclasses
import math
import os

from yunque.config import from_dict
from yunque.errors import CheckpointError, ConfigError, YunqueError
from yunque.model import ModelConfig

# No released decoder comes near this; a larger count is a corrupt or hostile config, and building
# the modules alone (even on the meta device) would take minutes.
MAX_LAYERS = 4096
_POSITIVE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)


def checked(cfg: ModelConfig, src: str, error: type[YunqueError] = CheckpointError) -> ModelConfig:
    """`cfg` with every field's type and range checked (ints stay ints, numbers become floats);
    otherwise `error` naming `src` and the field."""
    try:
        cfg = from_dict(ModelConfig, {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)})
    except ConfigError as e:
        raise error(f"{src}: {e}") from None

    def bad(field: str, why: str) -> YunqueError:
        return error(f"{src}: {field}: {why}")

    for f in _POSITIVE:
        if getattr(cfg, f) <= 0:
            raise bad(f, f"must be a positive integer, got {getattr(cfg, f)!r}")
    for f in ("head_dim", "sliding_window"):
        v = getattr(cfg, f)
        if v is not None and v <= 0:
            raise bad(f, f"must be a positive integer or null, got {v!r}")
    if cfg.num_hidden_layers > MAX_LAYERS:
        raise bad("num_hidden_layers", f"{cfg.num_hidden_layers} layers is more than the {MAX_LAYERS} yunque accepts")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise bad(
            "num_key_value_heads",
            f"{cfg.num_key_value_heads} does not divide num_attention_heads {cfg.num_attention_heads}",
        )
    if cfg.head_dim is None and cfg.hidden_size % cfg.num_attention_heads:
        raise bad(
            "num_attention_heads",
            f"{cfg.num_attention_heads} does not divide hidden_size {cfg.hidden_size} (and head_dim is not given)",
        )
    if cfg.head_size % 2:
        raise bad("head_dim", f"the head dimension {cfg.head_size} must be even (rotary embeddings rotate pairs)")
    for f in ("rms_norm_eps", "rope_theta"):
        v = getattr(cfg, f)
        if not (math.isfinite(v) and v > 0):
            raise bad(f, f"must be a positive finite number, got {v!r}")
    if not (math.isfinite(cfg.initializer_range) and cfg.initializer_range >= 0):
        raise bad("initializer_range", f"must be a finite number >= 0, got {cfg.initializer_range!r}")
    _check_rope_scaling(cfg.rope_scaling, bad)
    return cfg


def _check_rope_scaling(rs: dict | None, bad) -> None:
    if not rs:
        return

    def num(key: str, minimum: float = 0.0) -> float:
        v = rs.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= minimum:
            raise bad(f"rope_scaling.{key}", f"must be a finite number > {minimum:g}, got {v!r}")
        return float(v)

    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("linear", "llama3"):
        num("factor")
    if kind == "llama3":
        lo = num("low_freq_factor")
        num("high_freq_factor", lo)
        ctx = rs.get("original_max_position_embeddings")
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx <= 0:
            raise bad("rope_scaling.original_max_position_embeddings", f"must be a positive integer, got {ctx!r}")


def parameter_count(cfg: ModelConfig) -> int:
    """The Transformer's parameter count (tied embeddings once), by arithmetic: nothing is built."""
    D, V, F, H, K, hd = (
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_size,
    )
    attn = 2 * D * H * hd + 2 * D * K * hd
    attn += (H + 2 * K) * hd if cfg.attention_bias else 0
    attn += D if cfg.attention_out_bias else 0
    mlp = 3 * D * F + ((2 * F + D) if cfg.mlp_bias else 0)
    layer = attn + mlp + 2 * D  # two RMSNorm weights
    return V * D + cfg.num_hidden_layers * layer + D + (0 if cfg.tie_word_embeddings else V * D)


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


def check_fits(
    cfg: ModelConfig,
    bytes_per_parameter: float,
    src: str,
    *,
    what: str = "its weights",
    error: type[YunqueError] = CheckpointError,
    memory: int | None = None,
) -> int:
    """Refuse a model whose `bytes_per_parameter` x parameters exceed this machine's memory
    (`memory`, default: physical RAM); returns the bytes needed."""
    n = parameter_count(cfg)
    need = int(n * bytes_per_parameter)
    have = physical_memory() if memory is None else memory
    if have is not None and need > have:
        raise error(
            f"{src}: the model has {n:,} parameters and {what} need {_gib(need)}, "
            f"more than this machine's {_gib(have)} of memory"
        )
    return need
