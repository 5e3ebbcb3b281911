"""Verification is complete, not only consistent (issue 24 item 12): a split deleted from the manifest,
a file the manifest does not list, a symlink, a malformed manifest all fail `data verify`; damaged
gzip input is an error, a deeply nested line is one skipped record; run.json pins the manifest."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil

import pytest
from datahelp import cfg, sentence, write_jsonl

from yunque.__main__ import main
from yunque.data.pipeline import prepare, verify
from yunque.errors import DataError

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("complete")
    src = write_jsonl(tmp / "in.jsonl", [{"text": sentence(i, 12)} for i in range(90)])
    prepare([src], tmp / "d", cfg(pii={"enabled": False}, dedup={"near": "off"}), **QUIET)
    return tmp / "d"


@pytest.fixture
def data(pristine, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(pristine, out)
    return out


def _edit_manifest(d, fn):
    p = d / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m, indent=2))


def _verify_cli(capsys, d) -> str:
    assert main(["data", "verify", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_deleting_a_split_from_the_manifest_is_caught(data, capsys):
    # the attack: swap val for other data, then drop val's entries so nothing checks it
    (data / "val.jsonl").write_bytes((data / "train.jsonl").read_bytes())

    def drop_val(m):
        del m["splits"]["val"]
        del m["files"]["val.jsonl"]
        del m["files"]["hashes/val.sha256"]

    _edit_manifest(data, drop_val)
    assert "split 'val' is missing from the manifest" in _verify_cli(capsys, data)


def test_a_split_pointing_at_other_files_is_caught(data):
    _edit_manifest(
        data,
        lambda m: m["splits"]["test"].update(
            file="train.jsonl",
            hashes="hashes/train.sha256",
            records=m["splits"]["train"]["records"],
            merkle_root=m["splits"]["train"]["merkle_root"],
        ),
    )
    with pytest.raises(DataError, match="split 'test' names files 'train.jsonl'"):
        verify(data)


def test_unlisted_files_are_caught(data):
    (data / "tokens").mkdir()
    (data / "tokens" / "meta.json").write_text("{}")
    with pytest.raises(DataError, match=r"tokens/meta.json: not listed in the manifest"):
        verify(data)


def test_a_file_removed_from_the_listing_is_caught(data):
    _edit_manifest(data, lambda m: m["files"].pop("report.json"))
    with pytest.raises(DataError, match=r"report.json: not listed in the manifest"):
        verify(data)


def test_symlinks_and_special_files_are_refused(data, tmp_path):
    target = tmp_path / "elsewhere.jsonl"
    shutil.copy(data / "val.jsonl", target)
    (data / "val.jsonl").unlink()
    os.symlink(target, data / "val.jsonl")
    with pytest.raises(DataError, match=r"val.jsonl: a symlink"):
        verify(data)
    (data / "val.jsonl").unlink()
    os.mkfifo(data / "val.jsonl")  # would block a reader forever
    with pytest.raises(DataError, match=r"val.jsonl: not a regular file"):
        verify(data)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.update(files=[]), "files must be an object"),
        (lambda m: m["files"].update({"report.json": {"sha256": 1}}), "files\\['report.json'\\] must be"),
        (lambda m: m["splits"]["train"].pop("merkle_root"), "splits\\['train'\\] must be"),
        (lambda m: m["splits"]["train"].update(records="12"), "splits\\['train'\\] must be"),
        (lambda m: m.update(inputs={"path": 1}), "inputs must be"),
        (lambda m: m["files"].update({"../outside.txt": m["files"]["report.json"]}), "outside.txt: missing"),
    ],
)
def test_malformed_manifest_is_one_error(data, capsys, edit, needle):
    _edit_manifest(data, edit)
    err = _verify_cli(capsys, data)
    assert "Traceback" not in err
    import re

    assert re.search(needle, err), err


def test_deeply_nested_manifest(data, capsys):
    (data / "manifest.json").write_text("[" * 100_000)
    assert "manifest is not valid JSON" in _verify_cli(capsys, data)


def test_truncated_or_corrupt_gzip_is_an_error(tmp_path, capsys):
    rows = "".join(json.dumps({"text": sentence(i, 20)}) + "\n" for i in range(3000)).encode()
    whole = gzip.compress(rows)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])
    (tmp_path / "bad.jsonl.gz").write_bytes(whole[:200] + bytes(64) + whole[264:])
    for name in ("cut.jsonl.gz", "bad.jsonl.gz"):
        with pytest.raises(DataError, match=rf"{name}:\d+: cannot read further"):
            prepare([tmp_path / name], tmp_path / f"out-{name}", cfg(pii={"enabled": False}), **QUIET)
        assert not (tmp_path / f"out-{name}").exists()
        assert main(["data", "prepare", str(tmp_path / name), "--out", str(tmp_path / "o2")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot read further" in err[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_one_deeply_nested_line_is_skipped_with_its_reason(tmp_path, workers):
    lines = [
        json.dumps({"text": sentence(0)}),
        "[" * 100_000 + "]" * 100_000,
        '{"text": ' + "[" * 50_000 + "]" * 50_000 + "}",
        json.dumps({"text": sentence(1)}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    r = prepare(
        [tmp_path / "in.jsonl"],
        tmp_path / "out",
        cfg(pii={"enabled": False}, workers=workers, read={"format": "text"}),
        **QUIET,
    )
    assert r.records_kept == 2 and r.dropped == {"invalid_json": 2}
    assert r.report["examples"]["invalid_json"][0] == f"{tmp_path / 'in.jsonl'}:2: malformed JSON: nested too deeply"


def test_nested_json_array_element_is_an_error_item(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[{"text": "fine one two three"},\n' + "[" * 100_000 + "]" * 100_000 + "]")
    r = prepare([p], tmp_path / "out", cfg(pii={"enabled": False}, read={"format": "text"}), **QUIET)
    assert r.records_kept == 1 and r.dropped == {"invalid_json": 1}


def test_run_json_records_the_manifest_sha256(tmp_path):
    from train_util import make_corpus

    from yunque.config import from_dict
    from yunque.data.config import DataConfig
    from yunque.recipes.train import train
    from yunque.train.config import TrainConfig

    corpus = make_corpus(tmp_path / "c", n_lines=60)
    prepare([corpus["sft"]], tmp_path / "data", DataConfig(tokenizer=corpus["tok"], workers=1), **QUIET)
    r = train(
        from_dict(
            TrainConfig,
            {
                "method": "pretrain",
                "out_dir": str(tmp_path / "run"),
                "data": {"dir": str(tmp_path / "data"), "seq_len": 32},
                "model": {
                    "preset": "tiny",
                    "overrides": {
                        "num_hidden_layers": 1,
                        "hidden_size": 32,
                        "intermediate_size": 64,
                        "num_attention_heads": 2,
                        "num_key_value_heads": 1,
                    },
                },
                "micro_batch": 2,
                "max_steps": 1,
                "eval": {"every": 0},
                "checkpoint": {"every": 0},
                "log": {"plot": False},
            },
        )
    )
    run = json.loads(r.run_json.read_text())
    assert (
        run["data"]["manifest_sha256"] == hashlib.sha256((tmp_path / "data" / "manifest.json").read_bytes()).hexdigest()
    )


def test_undecodable_bytes_in_a_key_are_reported_escaped(tmp_path):
    p = tmp_path / "arr.json"
    p.write_bytes(b'[{"text": "fine one two three"},\n {"\xfftext": "no text field here"}]')
    r = prepare([p], tmp_path / "out", cfg(pii={"enabled": False}, read={"format": "text"}), **QUIET)
    assert r.records_kept == 1 and r.dropped == {"missing_field": 1}
    assert "\\udcfftext" in r.report["examples"]["missing_field"][0]
    assert "\\\\udcfftext" in (tmp_path / "out" / "report.json").read_text()


def test_undecodable_bytes_in_a_label_drop_only_that_record(tmp_path):
    p = tmp_path / "rows.tsv"
    p.write_bytes(b"text\tlabel\nfirst fine row of words\tpos\nsecond row of words\tne\xffg\n")
    r = prepare([p], tmp_path / "out", cfg(pii={"enabled": False}, read={"format": "classification"}), **QUIET)
    assert r.records_kept == 1 and r.dropped == {"invalid_utf8": 1}
