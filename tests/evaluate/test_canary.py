"""Canaries: unique, reproducible, planted at the requested rate without touching the input, detected on leak."""

import copy
import json

import pytest

from yunque.errors import DataError
from yunque.evaluate.canary import Canary, leaked, load_canaries, make_canaries, plant_canaries, save_canaries


def test_make_canaries_unique_and_reproducible():
    a, b = make_canaries(200, seed=7), make_canaries(200, seed=7)
    assert a == b and a != make_canaries(200, seed=8)
    assert len({c.prefix for c in a}) == len({c.secret for c in a}) == len({c.text for c in a}) == 200
    assert all(c.text.startswith(c.prefix + " ") and c.secret in c.text for c in a)


def test_plant_canaries_rate_and_shapes():
    records = [{"kind": "text", "text": f"doc {i}"} for i in range(90)]
    records += [
        {"kind": "chat", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ] * 5
    records += [{"kind": "completion", "prompt": "p", "completion": "c"}] * 5
    records += [{"kind": "weird"}]  # nothing to plant into: never chosen, never dropped
    before = copy.deepcopy(records)
    canaries = make_canaries(3, seed=0)
    out, placements = plant_canaries(records, canaries, rate=0.2, seed=1)
    assert records == before  # inputs untouched
    assert len(out) == len(records)
    assert len(placements) == round(0.2 * 100)
    blob = json.dumps(out)
    for c in canaries:  # round-robin: every canary planted, about equally often
        assert blob.count(c.secret) in (6, 7)
    for p in placements:
        assert p["canary"] in json.dumps(out[p["index"]])
    assert out[-1] == {"kind": "weird"}
    for p in placements:  # chat records get the canary in the reply, which is what fine-tuning learns from
        rec = out[p["index"]]
        if rec["kind"] == "chat":
            assert p["canary"] in rec["messages"][1]["content"] and rec["messages"][0]["content"] == "q"
    assert plant_canaries(records, canaries, rate=0.2, seed=1)[1] == placements
    assert plant_canaries(records, canaries, rate=0.0)[1] == []
    with pytest.raises(ValueError):
        plant_canaries(records, canaries, rate=1.5)


def test_leak_detection():
    c = Canary("Account 1234abcd recovery code is", "amber-falcon-3817-quartz-ridge")
    assert leaked("... recovery code is amber-falcon-3817-quartz-ridge.", c)
    assert leaked("it was falcon-3817-quartz, I think", c)  # the core is enough
    assert not leaked("amber falcon quartz ridge", c)
    assert not leaked("3817", c)


def test_save_load_roundtrip_and_errors(tmp_path):
    cs = make_canaries(4, seed=2)
    save_canaries(cs, tmp_path / "c.json")
    assert load_canaries(tmp_path / "c.json") == cs
    (tmp_path / "bad.json").write_text('[{"prefix": "x"}]')
    with pytest.raises(DataError, match="item 0"):
        load_canaries(tmp_path / "bad.json")
    with pytest.raises(DataError, match="no such file"):
        load_canaries(tmp_path / "missing.json")


def test_canaries_cli(tmp_path):
    from yunque.cli import call_with_argv
    from yunque.recipes.evaluate import canaries_cmd

    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(50)))
    rc = call_with_argv(
        canaries_cmd,
        ["--data", str(src), "--out", str(tmp_path / "out.jsonl"), "--n", "2", "--rate", "0.1"],
        "yunque canaries",
    )
    assert rc == 0
    assert len(load_canaries(tmp_path / "out.canaries.json")) == 2
    assert len((tmp_path / "out.placements.jsonl").read_text().splitlines()) == 5
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 50
