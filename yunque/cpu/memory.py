"""PyTorch's large CPU tensors from one best-fit arena (csrc/cpu_arena.cpp), for training.

glibc's heap fragments under a training step's pattern of frees and re-allocations (peak RSS 1.3-1.4x
the peak of live tensor memory); the arena keeps it within ~10% at the same speed (bench/NOTES.md,
"CPU arena"). `install()` is process-wide and one-way: tensors made before it keep their own deleter,
later ones come from the arena. Built with g++ against torch's c10 headers on first use (~1 s) and
cached beside the CPU kernels. Without g++, off Linux, or with `yunque.cpu.enabled()` False, a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from pathlib import Path

import torch

from yunque import cpu
from yunque.cpu.build import compile_and_load

MIN_BYTES = 256 << 10  # below this, c10's allocator (glibc): small blocks are not what fragments
_SRC = Path(__file__).parent / "csrc" / "cpu_arena.cpp"


def _flags() -> list[str]:
    root = Path(torch.__file__).parent
    return [
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{root / 'include'}",
        f"-L{root / 'lib'}",
        "-lc10",
        f"-Wl,-rpath,{root / 'lib'}",
        f"-DYQ_TORCH_VERSION={torch.__version__}",
    ]  # in the cache key: the headers are torch's


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    lib = compile_and_load("cpu_arena", [_SRC], _flags(), "CPU arena", "tensors stay on glibc's heap")
    if lib is not None:
        lib.yq_arena_install.argtypes, lib.yq_arena_install.restype = [ctypes.c_long, ctypes.c_long], ctypes.c_int
        lib.yq_arena_stats.argtypes, lib.yq_arena_stats.restype = [ctypes.c_void_p], None
        lib.yq_arena_release_free.argtypes, lib.yq_arena_release_free.restype = [], ctypes.c_long
    return lib


_installed = False


def install(reserve: int | None = None) -> bool:
    """Serve CPU tensors >= 256 KiB from the arena from now on. True if it is (now) installed.

    `reserve`: bytes of address space to set aside (default: the machine's physical memory);
    tensors that no longer fit fall back to c10's allocator.
    """
    global _installed
    if _installed:
        return True
    lib = _lib() if cpu.enabled() else None
    if lib is None:
        return False
    if reserve is None:
        reserve = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    _installed = bool(lib.yq_arena_install(MIN_BYTES, reserve))
    return _installed


def stats() -> dict[str, int]:
    """Bytes: `used` (of the reserved range, resident once touched), `free` within it, `live`
    in tensors, `peak_used`; and `overflows` (blocks that did not fit and went to c10)."""
    out = (ctypes.c_long * 5)()
    if _installed:
        _lib().yq_arena_stats(out)
    return dict(zip(("used", "free", "live", "peak_used", "overflows"), out))


def release_free() -> int:
    """Return the pages of free blocks to the OS (for a process that goes on after training)."""
    return int(_lib().yq_arena_release_free()) if _installed else 0


def tune() -> bool:
    """Keep a CPU training step's memory from fragmenting or being handed back each step.

    Every step frees and re-allocates the same large activation and gradient buffers. Tensors
    >= 256 KiB go to the arena (see `install`). For what stays on glibc (small blocks, or all of it
    without the arena) mmap allocation and trimming are off: by default glibc serves blocks
    >= 128 KiB-32 MiB with fresh mmap()s and trims the heap on free, so each step page-faulted its
    working set back in (bench/NOTES.md, "CPU arena"). Returns whether the arena is installed.
    """
    if not cpu.enabled():
        return False
    arena = install()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
            libc.mallopt(M_MMAP_MAX, 0)
        except (OSError, AttributeError):
            pass
    return arena
