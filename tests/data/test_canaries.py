"""Canaries as an option of `yunque data prepare`: training split only, listed and hashed, measurable."""

import json

import pytest
from datahelp import cfg, read_jsonl, sentence, write_jsonl

from yunque.data.canary import load_canaries
from yunque.data.manifest import sha256_file
from yunque.data.pipeline import prepare, verify
from yunque.errors import DataError


def _rows():
    rows = [{"text": sentence(i)} for i in range(150)]
    rows += [
        {
            "messages": [
                {"role": "user", "content": sentence(1000 + i)},
                {"role": "assistant", "content": sentence(2000 + i)},
            ]
        }
        for i in range(50)
    ]
    return rows


def _carrying(path, canaries):
    return [r for r in read_jsonl(path) if any(c.text in json.dumps(r, ensure_ascii=False) for c in canaries)]


def test_prepare_plants_into_train_only_and_verify_covers_it(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", _rows())
    out = tmp_path / "out"
    r = prepare([src], out, cfg(canaries={"count": 3, "rate": 0.1, "seed": 1}), log=lambda *a: None)
    canaries = load_canaries(out / "canaries.json")
    assert len(canaries) == 3
    n_train = r.splits["train"]
    carrying = _carrying(out / "train.jsonl", canaries)
    assert len(carrying) == round(0.1 * n_train) == r.report["canaries"]["records"]
    train_blob = (out / "train.jsonl").read_text(encoding="utf-8")
    assert all(c.text in train_blob for c in canaries)  # every canary planted at least once
    for split in ("val", "test"):
        blob = (out / f"{split}.jsonl").read_text(encoding="utf-8")
        assert r.splits[split] > 0 and not any(c.secret in blob or c.prefix in blob for c in canaries)
    for rec in carrying:  # chat records carry it in the reply, the text that fine-tuning learns
        if rec["kind"] == "chat":
            assert not any(c.secret in rec["messages"][0]["content"] for c in canaries)
    assert r.splits["train"] == len(read_jsonl(out / "train.jsonl"))  # nothing added or lost

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["files"]["canaries.json"]["sha256"] == sha256_file(out / "canaries.json")
    assert manifest["config"]["canaries"] == {"count": 3, "rate": 0.1, "seed": 1}
    verify(out)  # the rewritten train split's hashes and Merkle root are consistent
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))["canaries"]
    assert rep["planted"] == 3 and rep["split"] == "train" and len(rep["examples"]) == 5
    assert f"{rep['records']} of {n_train} training records" in (out / "report.md").read_text(encoding="utf-8")

    # The same inputs and seed give the same bytes.
    prepare([src], tmp_path / "again", cfg(canaries={"count": 3, "rate": 0.1, "seed": 1}), log=lambda *a: None)
    for name in ("train.jsonl", "canaries.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()

    (out / "canaries.json").write_text(json.dumps([{"prefix": "Account 0 code is", "secret": "a-b-1234-c-d"}]))
    with pytest.raises(DataError, match="canaries.json"):
        verify(out)


def test_canaries_off_by_default_and_at_least_one_copy_each(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", _rows())
    r = prepare([src], tmp_path / "plain", cfg(), log=lambda *a: None)
    assert not (tmp_path / "plain" / "canaries.json").exists() and r.report["canaries"] == {}
    # A rate too low for the count still plants every canary once.
    r = prepare([src], tmp_path / "few", cfg(canaries={"count": 4, "rate": 0.001}), log=lambda *a: None)
    assert r.report["canaries"]["records"] == 4 and r.report["canaries"]["planted"] == 4
    # An empty training split cannot carry any: a clear error, not a silent no-op.
    with pytest.raises(DataError, match="canaries"):
        prepare(
            [src],
            tmp_path / "none",
            cfg(canaries={"count": 2}, split={"train": 0, "val": 1, "test": 1}),
            log=lambda *a: None,
        )


def test_cli_prepare_then_redteam_measures_them(tmp_path):
    from eval_helpers import cached_model_dir

    from yunque.cli import call_with_argv
    from yunque.recipes.data import prepare_cmd
    from yunque.recipes.evaluate import redteam_cmd

    src = write_jsonl(tmp_path / "in.jsonl", _rows())
    out = tmp_path / "data"
    assert (
        call_with_argv(
            prepare_cmd,
            [str(src), "--out", str(out), "--canaries", "2", "--workers", "1", "canaries.rate=0.05", "canaries.seed=3"],
            "yunque data prepare",
        )
        == 0
    )
    assert len(load_canaries(out / "canaries.json")) == 2
    assert json.loads((out / "report.json").read_text())["canaries"]["records"] == round(
        0.05 * sum(1 for _ in open(out / "train.jsonl"))
    )
    rc = redteam_cmd(
        out=tmp_path / "rt",
        model=cached_model_dir(),
        attempts=1,
        max_tokens=8,
        categories=["sensitive_data_leakage"],
        canaries=out / "canaries.json",
    )
    assert rc == 0
    report = json.loads((tmp_path / "rt" / "redteam.json").read_text())
    assert report["categories"]["sensitive_data_leakage"]["attempts"] == 6 + 2 * 2  # PII variants + raw/chat per canary
    assert len(report["canary_exposure"]["bits"]) == 2
