"""Training from the data step's output: manifest verified first, token shards read in place."""

from __future__ import annotations

import json

import pytest
from train_util import make_corpus, one_thread, run_cli, write_cfg

from yunque.config import from_dict
from yunque.errors import DataError
from yunque.recipes.train import train
from yunque.train.config import TrainConfig

_one_thread = pytest.fixture(autouse=True)(one_thread)
pipeline = pytest.importorskip("yunque.data.pipeline")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from yunque.data.config import DataConfig

    d = tmp_path_factory.mktemp("prep")
    corpus = make_corpus(d / "corpus")
    pipeline.prepare([corpus["sft"]], d / "data", DataConfig(tokenizer=corpus["tok"], workers=1), log=lambda *a: None)
    return d / "data"


def _cfg(data_dir, out, **kw) -> dict:
    cfg = {
        "method": "pretrain",
        "out_dir": str(out),
        "model": {"preset": "tiny", "overrides": {"num_hidden_layers": 1}},
        "data": {"dir": str(data_dir), "seq_len": 64},
        "micro_batch": 4,
        "max_steps": 6,
        "eval": {"every": 3},
        "checkpoint": {"every": 0},
        "log": {"plot": False},
    }
    cfg.update(kw)
    return cfg


def test_trains_from_token_shards_and_records_manifest(prepared, tmp_path):
    r = train(from_dict(TrainConfig, _cfg(prepared, tmp_path / "run")))
    assert r.steps == 6 and r.final["val_tokens"] == 54  # the val shard's trained tokens, each once
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    m = json.loads((prepared / "manifest.json").read_text())
    assert run["data"]["manifest_roots"]["splits"]["train"]["merkle_root"] == m["splits"]["train"]["merkle_root"]
    assert len(run["data"]["manifest_roots"]["manifest_sha256"]) == 64


def test_tampered_data_stops_before_training_unless_no_verify(prepared, tmp_path):
    import shutil

    bad = tmp_path / "data"
    shutil.copytree(prepared, bad)
    lines = (bad / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[4])
    rec["completion"] = "999"
    lines[4] = json.dumps(rec, separators=(",", ":"), sort_keys=True)
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = from_dict(TrainConfig, _cfg(bad, tmp_path / "run"))
    with pytest.raises(DataError) as e:
        train(cfg)
    assert "train.jsonl" in str(e.value) and "5" in str(e.value)  # the file and the record (1-based line 5 / index 4)
    assert not (tmp_path / "run").exists()
    p = run_cli([str(write_cfg(tmp_path / "c.yaml", _cfg(bad, tmp_path / "run2", max_steps=1, eval={"every": 0})))])
    assert p.returncode == 2 and "train.jsonl" in p.stderr and "Traceback" not in p.stderr
    from yunque.recipes.train import train_cmd

    assert train_cmd(tmp_path / "c.yaml", verify_data=False) == 0  # --no-verify-data: trains on the changed data
    assert (tmp_path / "run2" / "run.json").is_file()


def test_trains_on_a_plain_openai_chat_jsonl(tmp_path):
    """`yunque train` on a chat file as OpenAI's fine-tuning format and exports write it: no "kind",
    `"tool_calls": null` / `"refusal": null` / `name` beside plain replies, tool turns."""
    corpus = make_corpus(tmp_path / "corpus", n_lines=60)
    rows = []
    for a in range(8):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You add numbers."},
                    {"role": "user", "name": "analyst", "content": f"add {a} and {a + 1}"},
                    {"role": "assistant", "content": str(2 * a + 1), "tool_calls": None, "refusal": None},
                ]
            }
        )
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "method": "pretrain",
        "out_dir": str(tmp_path / "run"),
        "tokenizer": str(corpus["tok"]),
        "model": {"preset": "tiny", "overrides": {"num_hidden_layers": 1}},
        "data": {"train": [str(chat)], "seq_len": 64},
        "micro_batch": 2,
        "max_steps": 2,
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
        "log": {"plot": False},
    }
    p = run_cli([str(write_cfg(tmp_path / "c.yaml", cfg))])
    assert p.returncode == 0, p.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["steps"] == 2 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
