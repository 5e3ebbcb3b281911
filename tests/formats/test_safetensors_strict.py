"""Safetensors headers are read as strictly as the reference library reads them, and every refusal
names the file and the tensor (issue 24 item 9)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from yunque.errors import CheckpointError
from yunque.formats.safetensors_io import SafetensorsFile


def _write(path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _entry(begin, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def _refused(path, *needles):
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path).close()
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_a_file_the_library_writes_still_reads(tmp_path):
    p = tmp_path / "ok.safetensors"
    save_file(
        {"a": torch.arange(6.0).view(2, 3), "b": torch.zeros(0), "c": torch.ones(3, dtype=torch.bfloat16)}, str(p)
    )
    with SafetensorsFile(p) as f:
        assert sorted(f.keys()) == ["a", "b", "c"] and torch.equal(f.read("a"), torch.arange(6.0).view(2, 3))


def test_overlapping_offsets_are_refused(tmp_path):
    p = tmp_path / "overlap.safetensors"
    _write(p, json.dumps({"a": _entry(0, 8), "b": _entry(4, 12)}), bytes(12))
    _refused(p, "tensor b", "overlap tensor a")


def test_two_names_on_the_same_bytes_are_refused(tmp_path):
    p = tmp_path / "alias.safetensors"
    _write(p, json.dumps({"a": _entry(0, 8), "b": _entry(0, 8)}), bytes(8))
    _refused(p, "overlap tensor")


def test_gaps_and_trailing_bytes_are_refused(tmp_path):
    p = tmp_path / "gap.safetensors"
    _write(p, json.dumps({"a": _entry(0, 8), "b": _entry(16, 24)}), bytes(24))
    _refused(p, "tensor b", "bytes 8..16")
    _write(p, json.dumps({"a": _entry(0, 8)}), bytes(20))
    _refused(p, "12 bytes after the last tensor")


def test_duplicate_names_are_refused(tmp_path):
    p = tmp_path / "dup.safetensors"
    _write(p, '{"a": %s, "a": %s}' % (json.dumps(_entry(0, 8)), json.dumps(_entry(0, 8))), bytes(8))  # noqa: UP031
    _refused(p, "'a' appears twice")


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [2.5, 0.8], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "data_offsets"),
        ({"dtype": "F32", "shape": [True, True], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype"),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [2]}, "malformed header entry"),
        ([1, 2], "malformed header entry"),
    ],
)
def test_wrong_types_are_refused(tmp_path, entry, needle):
    p = tmp_path / "types.safetensors"
    _write(p, json.dumps({"t0": entry}), bytes(8))
    _refused(p, "tensor t0", needle)


def test_nesting_bomb_in_the_header_is_one_error(tmp_path):
    p = tmp_path / "deep.safetensors"
    _write(p, '{"a": ' + "[" * 200_000 + "]" * 200_000 + "}", b"")
    _refused(p, "nested too deeply")


def test_metadata_must_be_strings(tmp_path):
    p = tmp_path / "meta.safetensors"
    _write(p, json.dumps({"__metadata__": {"format": {"x": 1}}, "a": _entry(0, 8)}), bytes(8))
    _refused(p, "__metadata__")


def test_a_file_that_is_not_safetensors_does_not_echo_its_bytes(tmp_path):
    p = tmp_path / "passwd"
    p.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    msg = _refused(p, "not a safetensors file")
    assert str(struct.unpack("<Q", b"root:x:0")[0]) not in msg
