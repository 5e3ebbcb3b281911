"""CPU-specific speed-ups, behind one seam: hand-written kernels, an arena allocator, a decode layout.

- `build.py`: g++ build and cache of `csrc/`, CPU feature detection;
- `kernels.py`: the C++ kernels and their autograd functions (attention with RoPE, RMSNorm, SwiGLU,
  the head's cross-entropy), for x86 CPUs with AVX512-BF16; each returns None where it does not run;
- `memory.py`: `tune()`, the arena allocator and glibc settings for a training process;
- `decode.py`: `arrange_for_decode_`, weights re-laid out for oneDNN's GEMMs.

Only `yunque.ops` reaches in here, and falls back to plain PyTorch when this package is missing, off
or cannot build: deleting this folder leaves a yunque that trains, evaluates and serves, only slower.

`YUNQUE_CPU=0` in the environment turns every speed-up off; tests override `enabled`.
"""

from __future__ import annotations

import os

_ENABLED = os.environ.get("YUNQUE_CPU", "1") != "0"  # read once: every op asks, and os.environ costs ~1 us


def enabled() -> bool:
    """Whether yunque's CPU speed-ups may run: not when the process started with `YUNQUE_CPU=0`."""
    return _ENABLED
