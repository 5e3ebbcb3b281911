"""Reading safetensors files lean and loud.

Why not `safetensors.safe_open`: its memory map stays resident while a checkpoint loads,
so peak RSS reaches the file size plus the converted weights. Here each tensor is copied
from the map straight into its destination (converted to the target dtype), and its pages
are released at once, so peak RSS stays near the size of the weights in the target dtype.
Every malformed input (truncated file, bad header, overlapping offsets) becomes a
`CheckpointError` naming the file and tensor. Writing uses the safetensors library.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

from yunque.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One open .safetensors file: its header, and tensors read one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(self._fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name}: malformed header entry {info!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name}: byte range {begin}..{end} does not fit shape {list(shape)} of {info['dtype']}")
            if self._base + end > size:
                raise CheckpointError(f"{self.path}: truncated: tensor {name} needs {self._base + end} bytes, the file has {size}")
            self.entries[name] = (dtype, shape, begin, end)
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`, converted to `dtype` (or copied into `out`)."""
        src_dtype, shape, begin, end = self.entries[name]
        if out is None:
            out = torch.empty(shape, dtype=dtype or src_dtype)
        if end == begin:
            return out
        offset = self._base + begin
        if offset % src_dtype.itemsize == 0:
            # Aligned (as safetensors writes them): convert straight from the map, no staging copy.
            # A freed staging buffer would stay in glibc's heap and count in RSS.
            src = torch.frombuffer(self._map, dtype=src_dtype, count=(end - begin) // src_dtype.itemsize, offset=offset)
            out.view(-1).copy_(src)
        else:
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=offset)
            staging = torch.empty(shape, dtype=src_dtype)
            staging.view(-1).view(torch.uint8).copy_(raw)  # byte copy: no alignment demands on the file
            out.copy_(staging)
        self._release(begin, end)
        return out

    def _release(self, begin: int, end: int) -> None:
        # Drop the pages we just read from RSS; the file is read once, so nothing is lost.
        page = mmap.PAGESIZE
        start = (self._base + begin) // page * page
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, self._base + end - start)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_tensors(path: str | Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    with SafetensorsFile(path) as f:
        for name in f.keys():
            yield name, f.read(name, dtype)
