"""One parser of record shapes: a record trains on exactly the prompt evaluation gives it.

Every shape (and its edge cases) goes through the real code paths: training from the raw file
(`train.documents.load_data`), training from the data step's output (its train.jsonl and its token
shards), and evaluation (`evaluate.data.load_examples` + the runner's prompt rendering). The prompt
of a training document is everything before its last run of targets: the reply to the last user
turn, the completion, or the label.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datahelp import cfg, read_jsonl, write_jsonl
from tok_chat_templates import QWEN25
from tok_helpers import family_dir, trained_dir

from yunque.config import from_dict
from yunque.data.pipeline import prepare
from yunque.data.records import RecordError, parse
from yunque.data.shards import TokenShards
from yunque.evaluate.data import load_examples, to_example
from yunque.evaluate.runner import label_continuation, prompt_ids, prompt_text
from yunque.tokenizer import Tokenizer
from yunque.train.config import TrainConfig
from yunque.train.documents import load_data

SYSTEM = {"role": "system", "content": "You triage security alerts."}
USER = {"role": "user", "content": "Failed logins from 203.0.113.7: 40 in a minute. Verdict?"}
REPLY = {"role": "assistant", "content": "brute force"}

# name -> (raw record, the reference evaluation compares against)
RECORDS = {
    "alpaca": (
        {"instruction": "Classify the alert", "input": "40 failed logins", "output": "brute force"},
        "brute force",
    ),
    "alpaca_whitespace_input": ({"instruction": "Classify the alert", "input": " \n\t ", "output": "benign"}, "benign"),
    "alpaca_empty_input": ({"instruction": "Classify the alert", "input": "", "output": "benign"}, "benign"),
    "alpaca_null_input": ({"instruction": "Classify the alert", "input": None, "output": "benign"}, "benign"),
    "alpaca_missing_input": ({"instruction": "Classify the alert", "output": "benign"}, "benign"),
    "alpaca_system": (
        {"system": "Answer in one word.", "instruction": "Classify", "input": "port scan", "output": "recon"},
        "recon",
    ),
    "alpaca_whitespace_system": (
        {"system": "  ", "instruction": "Classify", "input": "port scan", "output": "recon"},
        "recon",
    ),
    "chat": ({"messages": [SYSTEM, USER, REPLY]}, "brute force"),
    "chat_no_system": ({"messages": [USER, REPLY]}, "brute force"),
    "chat_multi_turn": (
        {
            "messages": [
                USER,
                REPLY,
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "Forty failures in a minute."},
            ]
        },
        "Forty failures in a minute.",
    ),
    "chat_content_parts": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Verdict "}, {"type": "text", "text": "please"}]},
                REPLY,
            ]
        },
        "brute force",
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "Be terse."},
                {"from": "human", "value": "Verdict?"},
                {"from": "gpt", "value": "benign"},
            ]
        },
        "benign",
    ),
    "completion": ({"prompt": "2+2=", "completion": "4"}, "4"),
    "completion_prompt_ends_in_space": ({"prompt": "Q: verdict?\nA: ", "completion": "benign"}, "benign"),
    "question_answer": ({"question": "Which port does SSH use?", "answer": "22"}, "22"),
    "input_output": ({"input": "Which port does DNS use?", "output": "53"}, "53"),
    "several_references": ({"prompt": "Name a hash", "references": ["sha256", "blake2b"]}, "sha256"),
    "classification": ({"text": "Win free money now", "label": "spam"}, None),
    "classification_int_label": ({"text": "Great film", "label": 1}, None),
    "classification_text_ends_in_newline": ({"text": "Meeting moved to Tuesday.\n", "label": "ham"}, None),
    "classification_prompt_field": ({"prompt": "Reset your password here", "label": "phishing"}, None),
}


IM = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def env(request, tmp_path_factory):
    """Llama 3's template trims message content; ChatML (Qwen 2.5) keeps it as it is, so whitespace
    that one parser keeps and another drops shows in the prompt."""
    d = tmp_path_factory.mktemp("records")
    tok_dir = trained_dir(d)
    if request.param == "chatml":
        tok_dir = family_dir(
            tok_dir,
            d / "chatml",
            specials=IM,
            template=QWEN25,
            config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        )
    raw = {name: write_jsonl(d / f"{name}.jsonl", [rec]) for name, (rec, _) in RECORDS.items()}
    # The data step: every record kept as it is (no cleaning, scrubbing or dedup), all in train, tokenized.
    c = cfg(
        pii={"enabled": False},
        clean={"normalize": False},
        dedup={"exact": False, "near": "off"},
        split={"train": 1.0, "val": 0.0, "test": 0.0},
        tokenizer=str(tok_dir),
    )
    prepare(list(raw.values()), d / "prepared", c, log=lambda *_: None)
    return {"dir": d, "tok_dir": tok_dir, "tok": Tokenizer.from_dir(tok_dir), "raw": raw, "prepared": d / "prepared"}


def _train_docs(env, path: Path) -> list[tuple[list[int], list[bool]]]:
    """Documents as `yunque train` builds them from JSONL files (data.train)."""
    tc = from_dict(
        TrainConfig, {"tokenizer": str(env["tok_dir"]), "model": {"preset": "tiny"}, "data": {"train": [str(path)]}}
    )
    src = load_data(tc, env["tok"]).train
    out = []
    for i in range(len(src)):
        ids, mask = src.doc(i)
        out.append((ids.tolist(), [True] * len(ids) if mask is None else mask.tolist()))
    return out


def _eval_prompt(tok, ex) -> list[int]:
    text, templated = prompt_text(tok, ex, None)
    return prompt_ids(tok, text, templated)


def _last_target_run(mask: list[bool]) -> int:
    end = max(i for i, m in enumerate(mask) if m)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


@pytest.mark.parametrize("name", list(RECORDS))
def test_training_and_evaluation_prompt_a_record_identically(env, name):
    tok = env["tok"]
    raw_path = env["raw"][name]
    [(ids, mask)] = _train_docs(env, raw_path)
    at = _last_target_run(mask)
    [ex] = load_examples(raw_path)
    assert _eval_prompt(tok, ex) == ids[:at], f"{name}: evaluation prompt != training prompt"

    _, reference = RECORDS[name]
    if ex.kind == "classification":  # the label is scored as exactly the tokens training learns
        text, templated = prompt_text(tok, ex, None)
        ctx, label_ids = label_continuation(tok, text, ex.label, templated)
        assert ctx == ids[:at] and label_ids + [tok.eos_id] == ids[at:]
    else:
        assert ex.references[0] == reference

    # The data step's output trains (as JSONL and as token shards) and evaluates the same way.
    lines = read_jsonl(env["prepared"] / "train.jsonl")
    k = next(k for k, rec in enumerate(lines) if rec["source"] == f"{raw_path}:1")
    shard_ids, shard_mask = TokenShards(env["prepared"], "train").doc(k)
    assert (shard_ids.tolist(), shard_mask.astype(bool).tolist()) == (ids, mask)
    assert _train_docs(env, env["prepared"] / "train.jsonl")[k] == (ids, mask)
    assert _eval_prompt(tok, to_example(lines[k], f"train.jsonl:{k + 1}")) == ids[:at]


def test_blank_alpaca_input_and_system_are_not_part_of_the_prompt():
    with_blank = parse({"system": " ", "instruction": "Classify", "input": " \n", "output": "x"})
    assert with_blank == parse({"instruction": "Classify", "output": "x"})
    assert with_blank["messages"][0] == {"role": "user", "content": "Classify"}


def test_normalised_records_parse_to_themselves(env):
    for rec in read_jsonl(env["prepared"] / "train.jsonl"):
        rec.pop("source")
        assert parse(rec) == rec


@pytest.mark.parametrize(
    "obj, reason, message",
    [
        ({"instruction": "hi"}, "missing_field", "missing reference field 'output'"),
        ({"prompt": "hi"}, "missing_field", "missing reference field (expected one of: references, reference"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn", "no assistant message"),
        ({"text": "a", "label": True}, "wrong_type", "'label' must be a string or an integer, got bool"),
        ({"prompt": "a", "references": []}, "wrong_type", "a string or a non-empty list of strings"),
        ({"foo": 1}, "unknown_shape", "no known shape (fields: foo)"),
        (3, "unknown_shape", "no known shape"),
    ],
)
def test_parse_errors_name_the_field(obj, reason, message):
    with pytest.raises(RecordError) as e:
        parse(obj)
    assert e.value.reason == reason and message in str(e.value)


def test_training_from_a_raw_file_names_the_bad_line(env, tmp_path):
    from yunque.errors import DataError

    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "fine"}, {"instruction": "no answer"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: missing reference field 'output'"):
        _train_docs(env, path)


def test_records_from_data_prepare_keep_their_order_and_fields(env):
    lines = read_jsonl(env["prepared"] / "train.jsonl")
    assert len(lines) == len(RECORDS)
    refs = next(rec for rec in lines if rec["source"].startswith(str(env["raw"]["several_references"])))
    assert refs["completion"] == "sha256" and refs["references"] == ["sha256", "blake2b"]
    assert json.loads((env["prepared"] / "report.json").read_text())["records_dropped"] == 0


def test_a_label_beside_messages_is_kept_when_it_is_a_class():
    chat = {"messages": [USER, REPLY]}
    assert parse({**chat, "label": "brute_force"})["label"] == "brute_force"
    assert "label" not in parse({**chat, "label": ["auth", "ssh"]})  # tags, not a class: left out, record kept
    assert parse({**chat, "meta": {"verdict": 3}}, fields={"label": "meta.verdict"})["label"] == 3
    with pytest.raises(RecordError, match="'meta.verdict' must be a string or an integer"):
        parse({**chat, "meta": {"verdict": [3]}}, fields={"label": "meta.verdict"})
