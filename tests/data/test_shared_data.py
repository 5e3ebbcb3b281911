"""The whole pipeline on the shared real data sets (skipped, with the reason, where they are absent)."""

from __future__ import annotations

import json

import pytest
from datahelp import cfg

from yunque.data.pipeline import prepare, verify
from yunque.errors import DataError

QUIET = {"log": lambda *_: None}


def _reconciles(r) -> None:
    rep = r.report
    assert rep["records_in"] == rep["records_kept"] + rep["records_dropped"] == r.records_in
    assert rep["records_dropped"] == sum(rep["dropped_by_reason"].values())
    assert sum(r.splits.values()) == r.records_kept  # no oversampling configured
    assert rep["cross_split_overlap"] == {"exact": 0, "near": 0}


def _tamper_is_caught(out) -> None:
    verify(out)
    p = out / "val.jsonl"
    lines = p.read_bytes().split(b"\n")
    rec = json.loads(lines[4])
    rec["source"] = rec["source"] + "x"
    lines[4] = json.dumps(rec, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=rf"^{p}: record 4 \(line 5\): changed"):
        verify(out)


def test_alpaca_seed_tasks_nested_instances(shared_data, tmp_path):
    src = shared_data / "alpaca_seed_tasks.jsonl"
    n_tasks = n_instances = 0
    for line in src.read_text(encoding="utf-8").splitlines():
        n_tasks += 1
        n_instances += len(json.loads(line)["instances"])
    r = prepare([src], tmp_path / "out", cfg(read={"format": "alpaca", "explode": "instances"}), **QUIET)
    _reconciles(r)
    assert r.records_in == n_instances >= n_tasks  # one record per instance, not per task
    assert r.records_kept >= 0.9 * n_instances
    assert all("#" in x["source"] for x in map(json.loads, (tmp_path / "out" / "train.jsonl").read_text().splitlines()))
    again = prepare([src], tmp_path / "again", cfg(read={"format": "alpaca", "explode": "instances"}), **QUIET)
    assert again.manifest_sha256 == r.manifest_sha256  # same input and config, same roots (and bytes)
    _tamper_is_caught(tmp_path / "out")


def test_alpaca_zh_chinese(shared_data, tmp_path):
    src = shared_data / "alpaca_zh_10000.json"
    n = len(json.loads(src.read_text(encoding="utf-8")))
    r = prepare([src], tmp_path / "out", cfg(workers=2), **QUIET)
    assert r.report["shapes"] == {str(src): "alpaca"}
    _reconciles(r)
    assert r.records_in == n and r.records_kept >= 0.95 * n
    assert r.dropped.get("exact_duplicate", 0) >= 1  # the set repeats at least one record verbatim
    first = json.loads((tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert any("\u4e00" <= ch <= "\u9fff" for ch in first["messages"][0]["content"])  # Chinese survives intact
    _tamper_is_caught(tmp_path / "out")
