"""PII scrubbing inside the pipeline, token shards and their reader, and the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datahelp import all_records, cfg, sentence, write_jsonl

from yunque.data.pipeline import inspect, prepare, verify
from yunque.errors import DataError

QUIET = {"log": lambda *_: None}
SECRET_EMAIL = "maria.lopez@corp-mail.example"
AWS = "AKIAIOSFODNN7EXAMPLE"


def test_pii_redacted_counted_never_printed(tmp_path):
    rows = [
        {"instruction": f"Write to {SECRET_EMAIL} about the invoice", "input": "", "output": "Done."},
        {"instruction": "Store the key", "input": f"aws_access_key_id = {AWS}", "output": "Stored."},
        {"instruction": "No personal data", "input": "", "output": "Fine."},
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    r = prepare([src], tmp_path / "out", cfg(), **QUIET)
    text = json.dumps(all_records(tmp_path / "out"))
    assert SECRET_EMAIL not in text and AWS not in text and "[EMAIL]" in text and "[AWS_ACCESS_KEY]" in text
    assert r.report["pii_findings"]["EMAIL"] == 1 and r.report["pii_findings"]["AWS_ACCESS_KEY"] == 1
    assert r.report["pii_records_with_findings"] == 2
    for name in ("report.json", "report.md", "manifest.json"):
        body = (tmp_path / "out" / name).read_text(encoding="utf-8")
        assert SECRET_EMAIL not in body and AWS not in body


def test_pii_drop_and_report_modes(tmp_path):
    rows = [{"text": f"key {AWS} here"}, {"text": f"mail {SECRET_EMAIL}"}, {"text": "clean text"}]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    r = prepare([src], tmp_path / "out", cfg(pii={"modes": {"AWS_ACCESS_KEY": "drop", "EMAIL": "report"}}), **QUIET)
    assert r.dropped == {"pii_drop": 1}
    assert r.report["examples"]["pii_drop"] == [f"{src}:1: contains AWS_ACCESS_KEY"]
    texts = sorted(x["text"] for x in all_records(tmp_path / "out"))
    assert texts == ["clean text", f"mail {SECRET_EMAIL}"]  # report mode: counted, left in place
    assert r.report["pii_findings"] == {"AWS_ACCESS_KEY": 1, "EMAIL": 1}


def test_scrubbed_records_deduplicate(tmp_path):
    rows = [
        {"text": "Contact ana@example.org for the report on project Zeta"},
        {"text": "Contact bob@example.net for the report on project Zeta"},
    ]
    r = prepare([write_jsonl(tmp_path / "d.jsonl", rows)], tmp_path / "out", cfg(), **QUIET)
    assert r.dropped == {"exact_duplicate": 1}


def test_unknown_pii_type_is_a_config_error(tmp_path):
    from yunque.errors import ConfigError

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(ConfigError, match="EMAILS"):
        prepare([src], tmp_path / "out", cfg(pii={"modes": {"EMAILS": "drop"}}), **QUIET)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    tok_mod = pytest.importorskip("yunque.tokenizer")
    tmp = tmp_path_factory.mktemp("tok")
    corpus = tmp / "corpus.txt"
    corpus.write_text(
        "\n".join(sentence(i, 30) for i in range(300)) + "\nQuestion answer user assistant 0123456789\n",
        encoding="utf-8",
    )
    tok_mod.train_bpe([corpus], 400, tmp / "tok")
    return tmp / "tok"


def test_token_shards_and_reader(tmp_path, tokenizer_dir):
    from yunque.chat import render_chat
    from yunque.data.shards import TokenShards
    from yunque.tokenizer import Tokenizer

    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"instruction": f"Question {i}: {sentence(i, 8)}", "input": "", "output": f"answer {sentence(i + 500, 6)}"}
            for i in range(30)
        ],
    )
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": sentence(i + 900, 25)} for i in range(30)])
    comp = write_jsonl(
        tmp_path / "comp.jsonl", [{"prompt": f"Q {sentence(i + 2000, 5)}", "completion": f"A {i}"} for i in range(10)]
    )
    c = cfg(pii={"enabled": False}, tokenizer=str(tokenizer_dir), clean={"max_tokens": 60})
    r = prepare([chat, text, comp], tmp_path / "out", c, **QUIET)
    tok = Tokenizer.from_dir(tmp_path / "out" / "tokenizer")
    meta = json.loads((tmp_path / "out" / "tokens" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    total_docs = 0
    for split in ("train", "val", "test"):
        ds = TokenShards(tmp_path / "out", split)
        recs = [json.loads(x) for x in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
        assert len(ds) == len(recs) and ds.tokens.dtype == np.uint16 and ds.loss_mask.dtype == np.uint8
        assert ds.doc_offsets[0] == 0 and ds.doc_offsets[-1] == len(ds.tokens)
        total_docs += len(ds)
        for rec, (ids, mask) in zip(recs, ds):
            if rec["kind"] == "chat":
                want = render_chat(tok, rec["messages"])
                assert ids.tolist() == want.ids and mask.astype(bool).tolist() == want.assistant_mask
                answer = tok.decode(ids[mask.astype(bool)])
                assert rec["messages"][-1]["content"] in answer and "Question" not in answer
            elif rec["kind"] == "text":
                assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[0] == 0 and mask[1:].all()
                assert tok.decode(ids[1:-1]) == rec["text"]
            else:
                assert tok.decode(ids[mask.astype(bool)]) == rec["completion"] + tok.decode([tok.eos_id])
    assert total_docs == r.records_kept
    assert r.report["tokens"]["splits"]["train"]["tokens"] == len(TokenShards(tmp_path / "out", "train").tokens)
    verify(tmp_path / "out")
    shown = inspect(tmp_path / "out", 2)
    assert "⟦" in shown and "document 1" in shown and "trained" in shown
    (tmp_path / "out" / "tokens" / "train.mask.bin").write_bytes(b"\x01")
    with pytest.raises(DataError, match="train.mask.bin"):
        TokenShards(tmp_path / "out", "train")
    with pytest.raises(DataError, match="train.mask.bin"):
        verify(tmp_path / "out")


def test_token_limits_drop_records(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": sentence(i, n)} for i, n in enumerate((2, 20, 200))])
    c = cfg(pii={"enabled": False}, tokenizer=str(tokenizer_dir), clean={"min_tokens": 8, "max_tokens": 120})
    r = prepare([src], tmp_path / "out", c, **QUIET)
    assert r.dropped == {"too_few_tokens": 1, "too_many_tokens": 1}
    assert r.report["splits"]["train"].get("mean_length_tokens") is not None


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    from yunque import __main__ as entry

    entry.COMMANDS.setdefault("data prepare", ("yunque.recipes.data", "prepare_cmd", ""))
    entry.COMMANDS.setdefault("data verify", ("yunque.recipes.data", "verify_cmd", ""))
    entry.COMMANDS.setdefault("data inspect", ("yunque.recipes.data", "inspect_cmd", ""))
    code = entry.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prepare_verify_inspect_and_errors(tmp_path, capsys):
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"instruction": sentence(i, 8), "output": f"ok {i}"} for i in range(40)] + [{"x": 1}]
    )
    (tmp_path / "data.yaml").write_text("pii:\n  enabled: false\ndedup:\n  near: 'off'\nworkers: 1\n", encoding="utf-8")
    out = tmp_path / "out"
    code, so, se = _main(
        [
            "data",
            "prepare",
            str(src),
            "--out",
            str(out),
            "--config",
            str(tmp_path / "data.yaml"),
            "--format",
            "alpaca",
            "split.seed=3",
        ],
        capsys,
    )
    assert code == 0, se
    assert "records in 41 = kept 40 + dropped 1" in so and f"{src}:41: missing field" in so
    assert json.loads((out / "manifest.json").read_text())["config"]["split"]["seed"] == 3
    code, so, _ = _main(["data", "verify", str(out)], capsys)
    assert code == 0 and "OK" in so and "merkle root" in so
    code, so, _ = _main(["data", "inspect", str(out), "--n", "1"], capsys)
    assert code == 0 and "41 records in" in so
    lines = (out / "train.jsonl").read_bytes().split(b"\n")
    (out / "train.jsonl").write_bytes(b"\n".join(lines[:2] + lines[3:]))
    code, _, se = _main(["data", "verify", str(out)], capsys)
    assert code == 2 and se.startswith(f"error: {out / 'train.jsonl'}: record 2 (line 3)") and "Traceback" not in se
    code, _, se = _main(
        [
            "data",
            "prepare",
            str(src),
            "--out",
            str(tmp_path / "o2"),
            "--on-error",
            "fail",
            "--config",
            str(tmp_path / "data.yaml"),
        ],
        capsys,
    )
    assert code == 2 and se.strip() == f"error: {src}:41: missing field 'instruction' (has: x)"
    (tmp_path / "bad.yaml").write_text("dedup:\n  near: maybe\n", encoding="utf-8")
    code, _, se = _main(
        ["data", "prepare", str(src), "--out", str(tmp_path / "o3"), "--config", str(tmp_path / "bad.yaml")], capsys
    )
    assert code == 2 and "bad.yaml:2: dedup.near: expected one of" in se
    code, _, se = _main(["data", "prepare", str(src)], capsys)  # argparse's usage error
    assert code == 2 and "the following arguments are required: --out" in se
