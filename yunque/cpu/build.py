"""Build yunque's C++ sources with g++ on first use, cache the library, and read the CPU's features.

A cached library is loaded only after its SHA-256 matches the one recorded at build time (and the
file is ours, not writable by others); otherwise it is rebuilt. A corrupt or swapped .so in the
cache is native code that would run in every process, so it is never trusted on its name alone.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import stat
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


def _load_verified(so: Path) -> ctypes.CDLL | None:
    """The cached library, loaded only if it is our own regular file and its SHA-256 is the one
    recorded when it was built (None otherwise: the caller rebuilds)."""
    try:
        fd = os.open(so, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None  # not ours, or others could have rewritten it
        h = hashlib.sha256()
        with os.fdopen(os.dup(fd), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        recorded = so.with_name(so.name + ".sha256")
        if recorded.is_symlink() or not recorded.is_file() or recorded.read_text().strip() != h.hexdigest():
            return None
        # By path, not /proc/self/fd/N: the loader caches libraries by name, and fd numbers are reused.
        # Only this user can replace the file (checked above), so nothing changes it in between.
        return ctypes.CDLL(str(so))
    finally:
        os.close(fd)


def compile_and_load(stem: str, srcs: list[Path], flags: list[str], label: str, fallback: str) -> ctypes.CDLL | None:
    """Build `srcs` with g++ ($CXX) into the cache once per source, compiler and flags, and load it.

    None when there is no compiler; None and a warning ("{label} unavailable, {fallback}") when the build fails.
    """
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256(
            b"".join(p.read_bytes() for p in srcs) + " ".join([cxx, version, *flags]).encode()
        ).hexdigest()[:16]
        cache = Path(os.environ.get("YUNQUE_CACHE") or Path.home() / ".cache" / "yunque") / "kernels"
        so = cache / f"{stem}-{key}.so"
        lib = _load_verified(so)
        if lib is not None:
            return lib
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # same folder: the rename is atomic
            out = Path(tmp) / so.name
            cmd = [cxx, *[str(p) for p in srcs if p.suffix == ".cpp"], *flags, "-o", str(out)]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            os.chmod(out, 0o755)  # whatever the umask: _load_verified refuses files others may write
            digest = Path(tmp) / "digest"
            digest.write_text(hashlib.sha256(out.read_bytes()).hexdigest())
            lib = ctypes.CDLL(str(out))  # the file just built, before it is visible to anyone else
            os.replace(out, so)
            os.replace(digest, so.with_name(so.name + ".sha256"))
        return lib
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"yunque: {label} unavailable, {fallback} ({detail.strip()[:300]})", stacklevel=3)
        return None
