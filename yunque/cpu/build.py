"""Build yunque's C++ sources with g++ on first use, cache the library, and read the CPU's features."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(flags.split(":", 1)[-1].split())


def compile_and_load(stem: str, srcs: list[Path], flags: list[str], label: str, fallback: str) -> ctypes.CDLL | None:
    """Build `srcs` with g++ ($CXX) into the cache once per source, compiler and flags, and load it.

    None when there is no compiler; None and a warning ("{label} unavailable, {fallback}") when the build fails.
    """
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256(b"".join(p.read_bytes() for p in srcs) + " ".join([cxx, version, *flags]).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("YUNQUE_CACHE") or Path.home() / ".cache" / "yunque") / "kernels"
        so = cache / f"{stem}-{key}.so"
        if not so.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # same folder: the rename is atomic
                out = Path(tmp) / so.name
                cmd = [cxx, *[str(p) for p in srcs if p.suffix == ".cpp"], *flags, "-o", str(out)]
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                os.replace(out, so)
        return ctypes.CDLL(str(so))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"yunque: {label} unavailable, {fallback} ({detail.strip()[:300]})", stacklevel=3)
        return None
