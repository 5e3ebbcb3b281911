"""Bad input is counted with its reason and position (or stops the run with on_error=fail); cleaning."""

from __future__ import annotations

import json

import pytest
from datahelp import all_records, cfg, write_jsonl

from yunque.data.clean import clean_text
from yunque.data.pipeline import prepare
from yunque.errors import DataError

NO_PII = {"enabled": False}
QUIET = {"log": lambda *_: None}


def _bad_inputs(tmp_path):
    good = {"instruction": "Name a color", "input": "", "output": "Blue"}
    lines = [
        json.dumps(good),
        '{"instruction": "broken", ',  # 2 malformed JSON
        json.dumps({"instruction": "no output here"}),  # 3 missing field
        json.dumps({"instruction": ["a list"], "output": "x"}),  # 4 wrong type
        '"just a string"',  # 5 not an object
        json.dumps({"instruction": "Name a fruit", "input": "", "output": "Apple"}),  # 6 ok
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}\n'
    )  # 7 invalid UTF-8
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]},  # bad role
            {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   \u200b "}]
            },  # empty after cleaning
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]
            },  # wrong content type
        ],
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    csv_path = tmp_path / "nocols.csv"
    csv_path.write_text("body,tag\nhello,x\n", encoding="utf-8")
    return src, chat, empty, csv_path


def test_every_error_counted_with_reason_and_position(tmp_path):
    src, chat, empty, csv_path = _bad_inputs(tmp_path)
    c = cfg(pii=NO_PII, read={"format": "auto", "max_examples": 3})
    r = prepare([src, chat, empty], tmp_path / "out", c, **QUIET)
    assert r.dropped == {
        "invalid_json": 1,
        "missing_field": 1,
        "wrong_type": 2,
        "not_an_object": 1,
        "invalid_utf8": 1,
        "bad_role": 1,
        "no_assistant_turn": 1,
        "empty_text": 1,
        "empty_file": 1,
    }
    assert r.records_in == r.records_kept + sum(r.dropped.values()) == 2 + 10
    ex = r.report["examples"]
    assert ex["invalid_json"][0].startswith(f"{src}:2: malformed JSON")
    assert ex["missing_field"][0].startswith(f"{src}:3: missing reference field 'output'")
    assert ex["not_an_object"][0].startswith(f"{src}:5: ")
    assert ex["invalid_utf8"][0].startswith(f"{src}:7: invalid UTF-8")
    assert ex["bad_role"][0].startswith(f"{chat}:1: message 0: unknown role 'wizard'")
    assert ex["empty_file"][0].startswith(f"{empty}:0: empty file")
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert f"{src}:2: malformed JSON" in md
    # a CSV without the needed columns: each row counted, naming the columns it does have
    r2 = prepare([csv_path], tmp_path / "out2", cfg(pii=NO_PII, read={"format": "classification"}), **QUIET)
    assert r2.dropped == {"missing_field": 1}
    assert "missing field (expected one of: text, prompt; has: body, tag)" in r2.report["examples"]["missing_field"][0]


@pytest.mark.parametrize(
    "which,expect", [(0, ":2: malformed JSON"), (1, ":1: message 0: unknown role"), (2, ":0: empty file")]
)
def test_on_error_fail_stops_at_first(tmp_path, which, expect):
    inputs = _bad_inputs(tmp_path)
    with pytest.raises(DataError, match=f"^{inputs[which]}{expect}"):
        prepare([inputs[which]], tmp_path / "out", cfg(pii=NO_PII, read={"on_error": "fail"}), **QUIET)


def test_failed_run_leaves_previous_output_untouched(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine too"}, {"nope": 1}])
    out = tmp_path / "out"
    first = prepare([good], out, cfg(pii=NO_PII), **QUIET)
    with pytest.raises(DataError, match="bad.jsonl:2: missing field"):
        prepare([bad], out, cfg(pii=NO_PII, read={"on_error": "fail", "format": "text"}), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]  # no staging left behind
    from yunque.data.pipeline import verify

    assert verify(out)["inputs"][0]["sha256"] and first.records_kept == 1
    assert all_records(out) == [{"kind": "text", "source": f"{good}:1", "text": "fine"}]


def test_on_error_fail_ignores_filters(tmp_path):
    # Duplicates and length filters are decisions, not input errors: on_error=fail does not stop on them.
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "same text"}, {"text": "same text"}, {"text": "x"}])
    r = prepare([src], tmp_path / "out", cfg(pii=NO_PII, read={"on_error": "fail"}, clean={"min_chars": 3}), **QUIET)
    assert r.dropped == {"exact_duplicate": 1, "too_short": 1}


def test_missing_inputs_and_bad_config_are_user_errors(tmp_path):
    from yunque.config import from_dict
    from yunque.data.config import DataConfig
    from yunque.errors import ConfigError

    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "nope.jsonl"], tmp_path / "out", cfg(pii=NO_PII))
    with pytest.raises(DataError, match="glob matches no files"):
        prepare([str(tmp_path / "*.parquet")], tmp_path / "out", cfg(pii=NO_PII))
    with pytest.raises(ConfigError, match="dedup.treshold: unknown key"):
        from_dict(DataConfig, {"dedup": {"treshold": 0.5}})
    with pytest.raises(ConfigError, match="read.fields.instr: unknown field"):
        from_dict(DataConfig, {"read": {"fields": {"instr": "q"}}})
    with pytest.raises(ConfigError, match="clean.max_chars"):
        from_dict(DataConfig, {"clean": {"min_chars": 10, "max_chars": 5}})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine", encoding="utf-8")
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare([src], tmp_path / "busy", cfg(pii=NO_PII))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_length_limits(tmp_path):
    src = write_jsonl(tmp_path / "l.jsonl", [{"text": "ab"}, {"text": "abcdef"}, {"text": "a" * 50}])
    r = prepare([src], tmp_path / "out", cfg(pii=NO_PII, clean={"min_chars": 3, "max_chars": 10}), **QUIET)
    assert r.dropped == {"too_short": 1, "too_long": 1} and r.records_kept == 1
    assert "2 characters < min_chars 3" in r.report["examples"]["too_short"][0]


def test_clean_text_rules():
    assert clean_text("e\u0301") == "\u00e9"  # NFC
    assert clean_text("a\x00b\x07c\x1bd") == "abcd"  # control characters
    assert clean_text("pay\u202eyalp\u200b now\ufeff") == "payyalp now"  # bidi override, zero-width, BOM
    assert clean_text("  a   b\t\tc  \r\n\r\n\r\n\r\nd  ") == "a b c\n\nd"
    assert clean_text("- item\n    - nested   item") == "- item\n    - nested item"  # indentation kept
    code = "Run:\n```python\ndef f(x):\n\n\n    return   x  \n```\nDone   now"
    assert clean_text(code) == "Run:\n```python\ndef f(x):\n\n\n    return   x  \n```\nDone now"
    assert clean_text("中文\u3000\u3000文本") == "中文 文本"


def test_cleaning_applies_to_records(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q:\u200b  what?  ", "completion": "e\u0301\x07"}])
    prepare([src], tmp_path / "out", cfg(pii=NO_PII), **QUIET)
    (rec,) = all_records(tmp_path / "out")
    assert (rec["prompt"], rec["completion"]) == ("Q: what?", "\u00e9")
