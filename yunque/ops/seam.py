"""The one way into yunque/cpu/, the CPU speed-ups: its modules, or None where that package was deleted.

Callers fall back to plain PyTorch on None, and each entry point in yunque.cpu returns None (or does
nothing) where it does not run, so a yunque without yunque/cpu/ trains, evaluates and serves, only slower.
"""

from __future__ import annotations

import torch

try:
    from yunque.cpu import decode, kernels, memory
except ModuleNotFoundError as e:
    if not (e.name or "").startswith("yunque.cpu"):  # a missing dependency is a real error
        raise
    decode = kernels = memory = None


def tune_cpu_memory() -> bool:
    """For a CPU training process: large tensors from yunque's arena, glibc's heap kept between steps
    (`yunque.cpu.memory.tune`). Returns whether the arena serves tensors from now on."""
    return memory is not None and memory.tune()


def release_cpu_memory() -> int:
    """Return the arena's free pages to the OS, for a process that goes on after training; bytes released."""
    return memory.release_free() if memory is not None else 0


def arrange_for_decode_(model: torch.nn.Module) -> int:
    """Lay out each CPU linear weight for fast decode (`yunque.cpu.decode`), same values; how many changed."""
    return decode.arrange_for_decode_(model) if decode is not None else 0
