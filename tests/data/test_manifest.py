"""The integrity manifest: every kind of tampering is caught and named by file and record index."""

from __future__ import annotations

import hashlib
import json

import pytest
from datahelp import cfg, sentence, write_jsonl

from yunque.data.manifest import MerkleBuilder, merkle_root
from yunque.data.pipeline import prepare, verify
from yunque.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest")
    src = write_jsonl(tmp / "in.jsonl", [{"text": sentence(i, 15)} for i in range(120)])
    prepare([src], tmp / "pristine", cfg(pii={"enabled": False}, dedup={"near": "off"}), log=lambda *_: None)
    return tmp


@pytest.fixture
def data(prepared, tmp_path):
    import shutil

    out = tmp_path / "d"
    shutil.copytree(prepared / "pristine", out)
    return out


def _lines(path):
    return path.read_bytes().split(b"\n")[:-1]


def _write(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_pristine_verifies_and_lists_inputs(data, prepared):
    m = verify(data)
    assert m["inputs_checked"] == [str(prepared / "in.jsonl")] and m["inputs_missing"] == []
    assert sum(s["records"] for s in m["splits"].values()) == 120
    for name in ("train.jsonl", "hashes/train.sha256", "report.json", "report.md", "lengths.png"):
        assert name in m["files"]


def test_record_changed(data):
    p = data / "train.jsonl"
    lines = _lines(p)
    rec = json.loads(lines[7])
    rec["text"] = rec["text"].replace("alpha", "ALPHA", 1) + "!"
    lines[7] = json.dumps(rec, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    _write(p, lines)
    with pytest.raises(DataError, match=rf"^{p}: record 7 \(line 8\): changed"):
        verify(data)


def test_record_deleted(data):
    p = data / "train.jsonl"
    lines = _lines(p)
    del lines[3]
    _write(p, lines)
    with pytest.raises(DataError, match=rf"^{p}: record 3 \(line 4\): record\(s\) deleted"):
        verify(data)


def test_last_record_deleted(data):
    p = data / "val.jsonl"
    lines = _lines(p)
    _write(p, lines[:-1])
    with pytest.raises(
        DataError,
        match=rf"^{p}: truncated or records deleted: has {len(lines) - 1} records.*first missing: record {len(lines) - 1}",  # noqa: E501
    ):
        verify(data)


def test_record_added(data):
    p = data / "test.jsonl"
    lines = _lines(p)
    lines.insert(2, b'{"kind":"text","source":"evil:1","text":"backdoor trigger"}')
    _write(p, lines)
    with pytest.raises(DataError, match=rf"^{p}: record 2 \(line 3\): record added"):
        verify(data)


def test_record_appended(data):
    p = data / "test.jsonl"
    n = len(_lines(p))
    with open(p, "ab") as fh:
        fh.write(b'{"kind":"text","source":"evil:1","text":"extra"}\n')
    with pytest.raises(DataError, match=rf"^{p}: record {n} \(line {n + 1}\) added"):
        verify(data)


@pytest.mark.parametrize("i,j", [(4, 5), (2, 9)])
def test_records_reordered(data, i, j):
    p = data / "train.jsonl"
    lines = _lines(p)
    lines[i], lines[j] = lines[j], lines[i]
    _write(p, lines)
    with pytest.raises(DataError, match=rf"^{p}: record {i} \(line {i + 1}\): reordered"):
        verify(data)


def test_file_truncated_inside_a_record(data):
    p = data / "train.jsonl"
    raw = p.read_bytes()
    n_full = raw[: len(raw) - 30].count(b"\n")
    p.write_bytes(raw[: len(raw) - 30])
    with pytest.raises(DataError, match=rf"^{p}: record {n_full} \(line {n_full + 1}\): file truncated"):
        verify(data)


def test_file_truncated_at_newline(data):
    p = data / "train.jsonl"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(DataError, match=rf"^{p}: record \d+ \(line \d+\): file truncated \(last line has no newline\)"):
        verify(data)


def test_hash_file_and_other_files_and_manifest(data):
    h = data / "hashes" / "val.sha256"
    h.write_bytes(h.read_bytes()[:-32])
    with pytest.raises(DataError, match=rf"^{h}: record-hash file differs"):
        verify(data)


def test_report_tampered(data):
    p = data / "report.json"
    p.write_text(p.read_text().replace('"records_in": 120', '"records_in": 121'))
    with pytest.raises(DataError, match=rf"^{p}: "):
        verify(data)


def test_manifest_missing_or_corrupt(data, tmp_path):
    (data / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest is not valid JSON"):
        verify(data)
    with pytest.raises(DataError, match="no manifest"):
        verify(tmp_path)


def test_changed_input_is_caught_missing_input_is_noted(data, prepared):
    m = json.loads((data / "manifest.json").read_text())
    m["inputs"][0]["path"] = str(prepared / "moved-away.jsonl")
    (data / "manifest.json").write_text(json.dumps(m))
    assert verify(data)["inputs_missing"] == [str(prepared / "moved-away.jsonl")]
    m["inputs"][0]["path"] = str(data / "report.md")  # exists, different bytes
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="input file changed"):
        verify(data)


def test_same_input_and_config_same_roots(prepared, tmp_path):
    src = prepared / "in.jsonl"
    a = prepare([src], tmp_path / "a", cfg(pii={"enabled": False}, dedup={"near": "off"}), log=lambda *_: None)
    pristine = (prepared / "pristine" / "manifest.json").read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == pristine  # byte-identical, report and PNG included
    assert a.manifest_sha256 == hashlib.sha256(pristine).hexdigest()


def test_merkle_rfc6962_shape():
    leaves = [bytes([i]) * 32 for i in range(7)]
    H = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    lh = [H(b"\x00" + x) for x in leaves]
    n = lambda a, b: H(b"\x01" + a + b)  # noqa: E731
    # RFC 6962: split at the largest power of two < n: 7 -> (4, 3) -> (2, 1)
    expect = n(n(n(lh[0], lh[1]), n(lh[2], lh[3])), n(n(lh[4], lh[5]), lh[6]))
    assert merkle_root(iter(leaves)) == expect.hex()
    mb = MerkleBuilder()
    assert mb.root() == hashlib.sha256(b"").hexdigest()
