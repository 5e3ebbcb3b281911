"""Tool-use data: `data prepare` and training keep a record's `tools`, assistant `tool_calls` and
`tool` messages, render them through the chat template exactly as transformers does, and train
the assistant's calls and replies, never the tool results. Preference pairs are counted as an
unsupported shape; a prepare that keeps nothing fails."""

from __future__ import annotations

import json

import pytest
from datahelp import cfg, read_jsonl, write_jsonl
from tok_chat_templates import LLAMA31, QWEN25
from tok_helpers import family_dir, trained_dir

from yunque.chat import render_chat
from yunque.config import from_dict
from yunque.data.pipeline import prepare
from yunque.data.records import RecordError, content_text, parse
from yunque.data.shards import TokenShards
from yunque.errors import DataError
from yunque.tokenizer import BOS, EOS, EOT, Tokenizer
from yunque.train.config import TrainConfig
from yunque.train.documents import load_data


def _tool(name: str, arg: str, what: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": what,
            "parameters": {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]},
        },
    }


TOOLS = [
    _tool("scan_host", "host", "Scan a host for open ports and vulnerable services"),
    _tool("send_report", "to", "Mail the findings"),
]
RESULT = '{"open_ports": [22], "banner": "SSH-2.0-OpenSSH_7.2"}'
SCAN = {  # OpenAI's fine-tuning format: arguments as JSON text, content null beside the call
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "You are a security assistant."},
        {"role": "user", "content": "Is web01 vulnerable?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "scan_host", "arguments": '{"host": "web01"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
        {"role": "assistant", "content": "web01 runs OpenSSH 7.2, which has known vulnerabilities."},
    ],
}
MAIL = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "Send the scan to the admin"},
        {
            "role": "assistant",
            "tool_calls": [
                {"type": "function", "function": {"name": "send_report", "arguments": {"to": "alice@example.com"}}}
            ],
        },
        {"role": "tool", "content": "queued as msg-4411"},
        {"role": "assistant", "content": "Done: the report is on its way."},
    ],
}
PLAIN = {"messages": [{"role": "user", "content": "What is a CVE?"}, {"role": "assistant", "content": "An ID."}]}
PREFERENCE = {"prompt": "Is telnet safe?", "chosen": "No: it is unencrypted.", "rejected": "Yes."}
IM = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILIES = {
    "qwen25": {
        "specials": IM,
        "config": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "template": QWEN25,
        "generation_eos": ["<|im_end|>", "<|endoftext|>"],
    },
    "llama31": {
        "config": {"bos_token": BOS, "eos_token": EOT},
        "template": LLAMA31,
        "generation_eos": [EOS, "<|eom_id|>", EOT],
    },
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def env(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tools")
    tok_dir = family_dir(trained_dir(d), d / request.param, **FAMILIES[request.param])
    src = write_jsonl(d / "tools.jsonl", [SCAN, MAIL, PLAIN, PREFERENCE])
    # Default cleaning, PII scrubbing and dedup: two records sharing one long tool list are not near duplicates.
    c = cfg(split={"train": 1.0, "val": 0.0, "test": 0.0}, tokenizer=str(tok_dir))
    r = prepare([src], d / "prepared", c, log=lambda *_: None)
    return {
        "src": src,
        "result": r,
        "out": d / "prepared",
        "tok_dir": tok_dir,
        "tok": Tokenizer.from_dir(tok_dir),
        "hf": transformers.AutoTokenizer.from_pretrained(str(tok_dir)),
        "records": read_jsonl(d / "prepared" / "train.jsonl"),
    }


def _hf_text(hf, rec: dict, messages: list[dict], agp: bool = False) -> str:
    return hf.apply_chat_template(messages, tools=rec.get("tools"), tokenize=False, add_generation_prompt=agp)


def test_prepare_keeps_tool_data_and_counts_the_preference_pair(env):
    r, src = env["result"], env["src"]
    assert (r.records_in, r.records_kept, r.dropped) == (4, 3, {"unsupported_shape": 1})
    report = json.loads((env["out"] / "report.json").read_text())
    assert report["examples"]["unsupported_shape"] == [
        f"{src}:4: preference data (chosen/rejected pairs) is not supported: yunque trains on one answer per "
        "prompt; keep the chosen answers as chat or completion records to fine-tune on them"
    ]
    assert report["input_errors"] == 1 and "| unsupported_shape | 1 |" in (env["out"] / "report.md").read_text()
    assert report["tokens"]["splits"]["train"]["documents"] == 3
    scan, mail, plain = env["records"]
    assert scan["tools"] == TOOLS and [m["role"] for m in scan["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert scan["messages"][2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "scan_host", "arguments": {"host": "web01"}}}
        ],
    }
    assert scan["messages"][3] == {"role": "tool", "tool_call_id": "call_1", "content": RESULT}
    # Tool-call arguments are text the data step scrubs, like message content.
    assert mail["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"to": "[EMAIL]"}
    assert "tools" not in plain and content_text(parse(PLAIN)) == "<user>\nWhat is a CVE?\n<assistant>\nAn ID."
    for rec in env["records"]:
        rec = {k: v for k, v in rec.items() if k != "source"}
        assert parse(rec) == rec  # normalised records are valid input


def test_rendering_equals_transformers_with_tools(env):
    tok, hf = env["tok"], env["hf"]
    shards = TokenShards(env["out"], "train")
    tc = from_dict(
        TrainConfig,
        {"tokenizer": str(env["tok_dir"]), "model": {"preset": "tiny"}, "data": {"train": [str(env["src"])]}},
    )
    # Training straight from the raw file stops at the preference pair, naming it.
    with pytest.raises(DataError, match=r"tools\.jsonl:4: preference data"):
        load_data(tc, tok)
    tc.data.train = [env["out"] / "train.jsonl"]
    trained = load_data(tc, tok).train
    for k, rec in enumerate(env["records"]):
        theirs = hf.apply_chat_template(rec["messages"], tools=rec.get("tools"), tokenize=True, return_dict=True)
        ids = shards.doc(k)[0].tolist()
        assert ids == theirs["input_ids"] == trained.doc(k)[0].tolist()
        assert render_chat(tok, rec["messages"], tools=rec.get("tools")).text == _hf_text(hf, rec, rec["messages"])


def test_mask_is_the_assistant_turns_and_never_the_tool_result(env):
    tok, hf = env["tok"], env["hf"]
    shards = TokenShards(env["out"], "train")
    for k, rec in enumerate(env["records"][:2]):
        ids, mask = (a.tolist() for a in shards.doc(k))
        runs, cur = [], []
        for i, m in zip(ids, mask):
            if m:
                cur.append(i)
            elif cur:
                runs.append(tok.decode(cur))
                cur = []
        runs += [tok.decode(cur)] if cur else []
        # What the model must write for each assistant turn, as transformers renders the chat: the
        # text between the generation prompt before the turn and the end of the turn.
        msgs, full = rec["messages"], _hf_text(hf, rec, rec["messages"])
        expected = [
            full[len(_hf_text(hf, rec, msgs[:i], agp=True)) : len(_hf_text(hf, rec, msgs[: i + 1]).rstrip())]
            for i, m in enumerate(msgs)
            if m["role"] == "assistant"
        ]
        assert runs == expected
        call = msgs[1 if k else 2]["tool_calls"][0]["function"]
        assert call["name"] in runs[0] and json.dumps(call["arguments"])[1:-1] in runs[0]
        marker = ("banner", "msg-4411")[k]  # a word only the tool result holds (templates may quote it)
        assert not any(marker in run for run in runs) and marker in full


def test_a_template_without_tools_is_an_error_not_an_empty_reply(tmp_path):
    tok_dir = trained_dir(tmp_path)  # yunque's own Llama 3 template writes no tools
    src = write_jsonl(tmp_path / "tools.jsonl", [PLAIN, SCAN])
    with pytest.raises(DataError, match=r"tools\.jsonl:2: the chat template of .* does not write tools"):
        prepare([src], tmp_path / "out", cfg(tokenizer=str(tok_dir)), log=lambda *_: None)
    tc = from_dict(TrainConfig, {"tokenizer": str(tok_dir), "model": {"preset": "tiny"}, "data": {"train": [str(src)]}})
    with pytest.raises(DataError, match=r"tools\.jsonl:2: the chat template of .* \('scan_host' is not in"):
        load_data(tc, Tokenizer.from_dir(tok_dir))


@pytest.mark.parametrize(
    "calls, message",
    [
        ([{"function": {"name": "f", "arguments": "{not json"}}], r"tool_calls\[0\]: arguments are not valid JSON"),
        ([{"function": {"name": "f", "arguments": "[1]"}}], r"tool_calls\[0\]: arguments must be a JSON object"),
        ([{"name": "f"}], r"tool_calls\[0\]: expected \{'type': 'function'"),
    ],
)
def test_bad_tool_calls_name_the_call(calls, message):
    rec = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": calls}]}
    with pytest.raises(RecordError, match=message) as e:
        parse(rec)
    assert e.value.reason == "wrong_type"
    with pytest.raises(RecordError, match="tools must be a list"):
        parse({**PLAIN, "tools": {"name": "f"}})


def test_prepare_that_keeps_nothing_fails_with_the_reasons(tmp_path, capsys):
    from yunque.__main__ import main

    src = write_jsonl(tmp_path / "pairs.jsonl", [PREFERENCE, {**PREFERENCE, "prompt": "Is FTP safe?"}])
    code = main(["data", "prepare", str(src), "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "no record survived: 2 read, all dropped (unsupported_shape 2)" in err
    assert (tmp_path / "out" / "report.md").is_file()  # the report says why


def test_evaluation_prompts_a_tool_record_as_it_was_trained(env):
    """The prompt of the last reply (tools, the call and its result before it) is the trained prefix."""
    from yunque.evaluate.data import to_example
    from yunque.evaluate.runner import prompt_ids, prompt_text

    tok = env["tok"]
    shards = TokenShards(env["out"], "train")
    for k, rec in enumerate(env["records"][:2]):
        ids, mask = (a.tolist() for a in shards.doc(k))
        at = max(i for i, m in enumerate(mask) if m)
        while mask[at - 1]:
            at -= 1
        ex = to_example(rec, f"train.jsonl:{k + 1}")
        assert prompt_ids(tok, *prompt_text(tok, ex, None)) == ids[:at]
        assert ex.references == [rec["messages"][-1]["content"]]


def test_openai_weight_zero_turns_are_context_not_targets(tmp_path):
    """OpenAI's fine-tuning format marks assistant turns not to learn with "weight": 0."""
    from yunque.data.encode import encode

    tok = Tokenizer.from_dir(trained_dir(tmp_path))
    raw = {
        "messages": [
            {"role": "user", "content": "Scan web01"},
            {"role": "assistant", "content": "I cannot do that.", "weight": 0},
            {"role": "user", "content": "You can: it is ours."},
            {"role": "assistant", "content": "Scanning web01 now.", "weight": 1},
        ]
    }
    rec = parse(raw)
    assert rec["messages"][1]["weight"] == 0 and "weight" not in rec["messages"][3] and parse(rec) == rec
    ids, mask = encode(tok, rec)
    assert [tok.decode([i for i, m in zip(ids, mask) if m])] == ["Scanning web01 now." + EOT]
    with pytest.raises(RecordError, match=r"message 1: weight must be 0 or 1, got 0.5"):
        parse({"messages": [raw["messages"][0], {**raw["messages"][1], "weight": 0.5}]})


def test_deeply_nested_tool_json_is_a_counted_record_error():
    deep = "[" * 5000 + "]" * 5000
    call = {"function": {"name": "f", "arguments": '{"a": ' + deep + "}"}}
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(RecordError, match=r"arguments (are not valid JSON|nested more than 64 levels)"):
        parse({"messages": msgs})
    nested: list = []
    for _ in range(100):
        nested = [nested]
    with pytest.raises(RecordError, match="tools: nested more than 64 levels deep"):
        parse({**PLAIN, "tools": [{"type": "function", "function": {"name": "f", "parameters": nested}}]})
