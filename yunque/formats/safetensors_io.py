"""Reading safetensors files lean and loud.

Why not `safetensors.safe_open`: its memory map stays resident while a checkpoint loads,
so peak RSS reaches the file size plus the converted weights. Here each tensor is copied
from the map straight into its destination (converted to the target dtype), and its pages
are released at once, so peak RSS stays near the size of the weights in the target dtype.
Every malformed input (truncated file, bad header, duplicate names, offsets that overlap or leave
gaps, non-integer shapes or offsets) becomes a `CheckpointError` naming the file and tensor.
Writing uses the safetensors library.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from yunque.errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; a second tensor under the same name must not hide the first.
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class SafetensorsFile:
    """One open .safetensors file: its header, and tensors read one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self._parse(os.fstat(self._fh.fileno()).st_size)
        except BaseException:
            self._fh.close()
            raise

    def _parse(self, size: int) -> None:
        if size < 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > min(_MAX_HEADER, size - 8):
            # Not the length itself: for a file that is not safetensors it is just its first 8 bytes.
            raise CheckpointError(
                f"{self.path}: not a safetensors file, or its header is corrupt or truncated "
                f"(the header length field exceeds the file's {size} bytes)"
            )
        try:
            header = json.loads(self._fh.read(n), object_pairs_hook=_no_duplicates)
        except _Duplicate as e:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header: name {e.args[0]!r} appears twice"
            ) from None
        except RecursionError:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (nested too deeply)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ must map strings to strings)")
        self.metadata = meta
        self._base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype, shape, begin, end = self._entry(name, info)
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize:
                raise CheckpointError(
                    f"{self.path}: tensor {name}: byte range {begin}..{end} does not fit shape {list(shape)} of {info['dtype']}"  # noqa: E501
                )
            if self._base + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name} needs {self._base + end} bytes, the file has {size}"
                )
            self.entries[name] = (dtype, shape, begin, end)
        self._check_layout(size)
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None

    def _entry(self, name: str, info: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        # Exact types only: int("3") or int(2.5) would quietly accept a header the reference library refuses.
        def ints(v: object) -> bool:
            return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)

        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(
                f"{self.path}: tensor {name}: malformed header entry {str(info)[:200]} "
                "(expected dtype, shape and data_offsets)"
            )
        if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name}: unsupported dtype {str(info['dtype'])[:40]!r} "
                f"(supported: {', '.join(DTYPES)})"
            )
        if not ints(info["shape"]):
            raise CheckpointError(
                f"{self.path}: tensor {name}: shape {str(info['shape'])[:200]} is not a list of non-negative integers"
            )
        offsets = info["data_offsets"]
        if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise CheckpointError(
                f"{self.path}: tensor {name}: data_offsets {str(offsets)[:200]} is not [begin, end] "
                "with integers 0 <= begin <= end"
            )
        return DTYPES[info["dtype"]], tuple(info["shape"]), offsets[0], offsets[1]

    def _check_layout(self, size: int) -> None:
        """Tensors tile the data section exactly, as the reference library requires: an overlap would
        let two names share bytes, a gap or a tail would carry bytes no tensor accounts for."""
        pos, prev = 0, None
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin < pos:
                raise CheckpointError(f"{self.path}: tensor {name}: bytes {begin}..{end} overlap tensor {prev}")
            if begin > pos:
                raise CheckpointError(
                    f"{self.path}: tensor {name}: starts at byte {begin}, leaving bytes {pos}..{begin} "
                    "that no tensor holds"
                )
            pos, prev = end, name
        if self._base + pos != size:
            raise CheckpointError(
                f"{self.path}: {size - self._base - pos} bytes after the last tensor that no tensor holds"
            )

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

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
