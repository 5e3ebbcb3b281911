"""Every input format and record shape, shape detection, field mapping and explode."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
from datahelp import all_records, cfg, write_jsonl

from yunque.data import read
from yunque.data.pipeline import prepare
from yunque.data.read import iter_file

NO_PII = {"enabled": False}


def _one(out: Path) -> dict:
    recs = all_records(out)
    assert len(recs) == 1, recs
    return recs[0]


def test_alpaca_jsonl_maps_to_chat_with_system_and_input(tmp_path):
    src = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "hola", "output": "hello", "system": "Be brief."}]
    )
    r = prepare([src], tmp_path / "out", cfg(pii=NO_PII), log=lambda *_: None)
    rec = _one(tmp_path / "out")
    assert rec["kind"] == "chat"
    assert rec["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate\n\nhola"},
        {"role": "assistant", "content": "hello"},
    ]
    assert rec["source"] == f"{src}:1"
    assert r.report["shapes"] == {str(src): "alpaca"}


def test_openai_chat_with_content_parts_and_sharegpt(tmp_path):
    src = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                    {"role": "assistant", "content": "Hello!"},
                ]
            },
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Q?"},
                    {"from": "gpt", "value": "A."},
                ]
            },
        ],
    )
    prepare([src], tmp_path / "out", cfg(pii=NO_PII), log=lambda *_: None)
    msgs = sorted((r["messages"] for r in all_records(tmp_path / "out")), key=len)
    assert msgs[0] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert [m["role"] for m in msgs[1]] == ["system", "user", "assistant"]


def test_completion_text_classification_shapes(tmp_path):
    comp = write_jsonl(tmp_path / "comp.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just some words"}])
    cls = write_jsonl(tmp_path / "cls.jsonl", [{"text": "great film", "label": 1}])
    r = prepare([comp, text, cls], tmp_path / "out", cfg(pii=NO_PII), log=lambda *_: None)
    kinds = {rec["kind"]: rec for rec in all_records(tmp_path / "out")}
    assert kinds["completion"]["prompt"] == "2+2=" and kinds["completion"]["completion"] == "4"
    assert kinds["text"]["text"] == "just some words"
    assert kinds["classification"]["label"] == 1
    assert sorted(r.report["shapes"].values()) == ["classification", "completion", "text"]


def test_json_array_streamed_with_line_numbers(tmp_path, monkeypatch):
    rows = [{"instruction": f"question {i} " + "x" * (i * 7), "input": "", "output": f"answer {i}"} for i in range(40)]
    path = tmp_path / "arr.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    monkeypatch.setattr(read, "_JSON_CHUNK", 37)  # elements straddle chunk boundaries
    items = list(iter_file(path))
    assert [i.kind for i in items] == ["obj"] * 40
    assert [i.payload for i in items] == rows
    text_lines = path.read_text().splitlines()
    for item in items:  # each source line is the element's opening brace
        assert text_lines[int(item.source.rsplit(":", 1)[1]) - 1].strip() == "{"


@pytest.mark.parametrize("block", [7, 64, 1 << 19])
def test_jsonl_blocks_split_into_the_same_lines(tmp_path, monkeypatch, block):
    from yunque.data import work
    from yunque.data.config import DataConfig

    rows = [{"text": f"line {i} " + "é" * (i % 13)} for i in range(60)]
    body = "".join(json.dumps(r, ensure_ascii=False) + ("\n\n" if i % 9 == 0 else "\n") for i, r in enumerate(rows))
    path = tmp_path / "b.jsonl.gz"
    with gzip.open(path, "wb") as gz:
        gz.write(b"\xef\xbb\xbf" + body.encode() + b'{"text": "no newline at end"}')
    monkeypatch.setattr(read, "_BLOCK", block)
    work.init_worker(DataConfig(workers=1))
    got = [
        r[1:3]
        for item in iter_file(path, blocks=True)
        for r in work.process_item(item.source, item.kind, item.payload, "text")
    ]
    want = [r[1:3] for item in iter_file(path) for r in work.process_item(item.source, item.kind, item.payload, "text")]
    assert got == want and len(got) == 61
    assert got[-1][0] == f"{path}:{len(body.splitlines()) + 1}"


def test_json_array_truncated_and_empty(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"},\n {"text": "b"},\n {"text": ', encoding="utf-8")
    items = list(iter_file(bad))
    assert [i.kind for i in items] == ["obj", "obj", "error"]
    assert items[-1].payload[0] == "invalid_json" and items[-1].source.endswith(":3")
    empty_arr = tmp_path / "empty.json"
    empty_arr.write_text("[ ]", encoding="utf-8")
    assert [i.payload[0] for i in iter_file(empty_arr)] == ["empty_file"]


def test_csv_tsv_parquet_text_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerow(["multi\nline cell", "pos"])
        w.writerow(["second", "neg"])
    (tmp_path / "t.tsv").write_text("text\tlabel\nfrom tsv\tpos\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["from parquet"], "label": ["neg"]}), tmp_path / "p.parquet")
    with open(tmp_path / "p.parquet", "rb") as fh, gzip.open(tmp_path / "pz.parquet.gz", "wb") as gz:
        gz.write(fh.read().replace(b"from parquet", b"from parqgz!"))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt", encoding="utf-8") as gz:
        gz.write(json.dumps({"text": "from gzip", "label": "pos"}) + "\n")
    items = {p: list(iter_file(tmp_path / p)) for p in ("c.csv", "t.tsv", "p.parquet", "z.jsonl.gz")}
    assert [i.source.rsplit(":", 1)[1] for i in items["c.csv"]] == ["2", "4"]  # a quoted newline spans lines
    assert items["c.csv"][0].payload == {"text": "multi\nline cell", "label": "pos"}
    out = tmp_path / "out"
    r = prepare(
        [
            tmp_path / "*.csv",
            tmp_path / "t.tsv",
            tmp_path / "p.parquet",
            tmp_path / "pz.parquet.gz",
            tmp_path / "z.jsonl.gz",
        ],
        out,
        cfg(pii=NO_PII, read={"format": "classification"}),
        log=lambda *_: None,
    )
    texts = sorted(rec["text"] for rec in all_records(out))
    assert texts == ["from gzip", "from parqgz!", "from parquet", "from tsv", "multi\nline cell", "second"]
    assert r.records_in == 6 and r.records_kept == 6


def test_plain_text_blocks_and_whole_files(tmp_path):
    (tmp_path / "doc.txt").write_text("para one\nstill one\n\n\npara two\n", encoding="utf-8")
    blocks = [i for i in iter_file(tmp_path / "doc.txt", "block")]
    assert [(i.source.rsplit(":", 1)[1], i.payload) for i in blocks] == [
        ("1", "para one\nstill one\n"),
        ("5", "para two\n"),
    ]
    whole = list(iter_file(tmp_path / "doc.txt", "file"))
    assert len(whole) == 1
    r = prepare([tmp_path / "doc.txt"], tmp_path / "out", cfg(pii=NO_PII), log=lambda *_: None)
    assert r.report["shapes"][str(tmp_path / "doc.txt")] == "text" and r.records_kept == 2


def test_field_mapping_and_explode_nested(tmp_path):
    src = write_jsonl(
        tmp_path / "seed.jsonl",
        [
            {
                "id": 1,
                "task": {"q": "Add the numbers"},
                "instances": [{"in": "1 2", "out": "3"}, {"in": "2 2", "out": "4"}],
            },
            {"id": 2, "task": {"q": "Say hi"}, "instances": []},
        ],
    )
    c = cfg(
        pii=NO_PII, read={"fields": {"instruction": "task.q", "input": "in", "output": "out"}, "explode": "instances"}
    )
    r = prepare([src], tmp_path / "out", c, log=lambda *_: None)
    recs = sorted(all_records(tmp_path / "out"), key=lambda x: x["source"])
    assert [x["source"] for x in recs] == [f"{src}:1#0", f"{src}:1#1"]
    assert recs[1]["messages"][0]["content"] == "Add the numbers\n\n2 2" and recs[1]["messages"][1]["content"] == "4"
    assert r.dropped == {"wrong_type": 1}  # the empty instances list, counted, not silently lost
    assert r.report["shapes"][str(src)] == "alpaca"


def test_unknown_shape_is_reported_per_record(tmp_path):
    src = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}, {"bar": 2}])
    r = prepare([src], tmp_path / "out", cfg(pii=NO_PII), log=lambda *_: None)
    assert r.dropped == {"unknown_shape": 2}
    assert r.report["examples"]["unknown_shape"][0].startswith(f"{src}:1: ")


def test_output_is_canonical_json(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "ünïcode ✓"}])
    prepare([src], tmp_path / "out", cfg(pii=NO_PII), log=lambda *_: None)
    for s in ("train", "val", "test"):
        for line in (tmp_path / "out" / f"{s}.jsonl").read_text(encoding="utf-8").splitlines():
            assert line == json.dumps(json.loads(line), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize("name", ["notes.docx", "data.xml"])
def test_unsupported_file_type_counted(tmp_path, name):
    (tmp_path / name).write_text("x", encoding="utf-8")
    r = prepare([tmp_path / name], tmp_path / "out", cfg(pii=NO_PII), log=lambda *_: None)
    assert r.dropped == {"unsupported_file": 1} and r.records_kept == 0
