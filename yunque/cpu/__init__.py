"""CPU-specific speed-ups, behind one seam: hand-written kernels, an arena allocator, a decode layout.

- `build.py`: g++ build and cache of `csrc/`, CPU feature detection;
- `kernels.py`: the C++ kernels and their autograd functions (attention with RoPE, RMSNorm, SwiGLU,
  the head's cross-entropy), for x86 CPUs with AVX512-BF16 (bf16 and fp32) or AVX2 + FMA (fp32);
  each returns None where it does not run;
- `memory.py`: `tune()`, the arena allocator and glibc settings for a training process;
- `decode.py`: `arrange_for_decode_`, weights re-laid out for oneDNN's GEMMs.

Only `yunque.ops` reaches in here, and falls back to plain PyTorch when this package is missing, off
or cannot build: deleting this folder leaves a yunque that trains, evaluates and serves, only slower.

`YUNQUE_CPU=0` in the environment turns every speed-up off; tests override `enabled`.
`YUNQUE_CPU_ISA=avx2` makes the kernels use their AVX2 build on a CPU with AVX-512 too (to test and
measure what AVX2-only CPUs run); tests override `forced_isa`.
"""

from __future__ import annotations

import os

_ENABLED = os.environ.get("YUNQUE_CPU", "1") != "0"  # read once: every op asks, and os.environ costs ~1 us
_ISA = os.environ.get("YUNQUE_CPU_ISA", "").lower() or None  # read once, as YUNQUE_CPU


def forced_isa() -> str | None:
    """The kernel build `YUNQUE_CPU_ISA` asks for ("avx2"), or None: the best the CPU runs."""
    return _ISA


def enabled() -> bool:
    """Whether yunque's CPU speed-ups may run: not when the process started with `YUNQUE_CPU=0`."""
    return _ENABLED
