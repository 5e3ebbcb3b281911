"""Constrained decoding through xgrammar: `response_format` json_schema / json_object and forced
tool calls, per sequence under continuous batching, with a random tiny model (so every valid
output is the grammar's doing, not the model's)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading

import httpx
import openai
import pytest
from serve_util import build_model_dir, make_server
from tok_chat_templates import LLAMA31, QWEN25

pytest.importorskip("xgrammar", reason="xgrammar is not installed (install.sh installs it)")
jsonschema_rs = pytest.importorskip("jsonschema_rs")

from yunque.formats.hf import load_model  # noqa: E402
from yunque.serve.engine import Engine, SeqParams  # noqa: E402
from yunque.serve.grammar import GrammarError, Grammars  # noqa: E402
from yunque.tokenizer import Tokenizer  # noqa: E402

FINDING = {
    "type": "object",
    "properties": {
        "severity": {"enum": ["low", "medium", "high", "critical"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "exploitable": {"type": "boolean"},
    },
    "required": ["severity", "score", "exploitable"],
    "additionalProperties": False,
}
LABEL = {"type": "object", "properties": {"label": {"enum": ["benign", "malicious"]}}, "required": ["label"]}
SCAN = {
    "type": "function",
    "function": {
        "name": "scan_host",
        "description": "Run the vulnerability scanner against one host",
        "parameters": {
            "type": "object",
            "properties": {"host": {"enum": ["web01", "db02"]}, "deep": {"type": "boolean"}},
            "required": ["host", "deep"],
            "additionalProperties": False,
        },
    },
}
BLOCK = {
    "type": "function",
    "function": {
        "name": "block_ip",
        "parameters": {
            "type": "object",
            "properties": {"rule": {"enum": ["a", "b"]}},
            "required": ["rule"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "Classify this log line."}]


def fmt(schema: dict, name: str = "finding") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# A template that lists tools writes a long system turn (up to ~1400 tokens of the tiny BPE, which also spells
# a call's JSON nearly byte by byte).
LIMITS = {"rpm": 10_000, "tpm": 10_000_000, "max_len": 2048, "max_prompt_tokens": 1800, "max_tokens": 160}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_structured")
    plain = build_model_dir(tmp / "plain", context=2048)
    dirs = {"plain": plain}
    for name, template in (("qwen", QWEN25), ("llama31", LLAMA31)):
        dirs[name] = tmp / name
        shutil.copytree(plain, dirs[name])
        (dirs[name] / "chat_template.jinja").write_text(template, encoding="utf-8")
    out, running = {}, []
    for name, d in dirs.items():
        srv, key, _ = make_server(d, tmp / f"run_{name}", limits=LIMITS)
        srv.__enter__()
        running.append(srv)
        out[name] = {
            "client": openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0),
            "url": srv.url,
            "key": key,
            "dir": d,
        }
    yield out
    for srv in running:
        srv.__exit__(None, None, None)


def test_json_schema_always_validates(servers):
    """20 samples at temperature 1, batched with unconstrained requests: all parse and validate."""
    s = servers["plain"]
    validator = jsonschema_rs.validator_for(FINDING)

    async def go():
        c = openai.AsyncOpenAI(base_url=s["url"] + "/v1", api_key=s["key"], max_retries=0)
        constrained = [
            c.chat.completions.create(
                model="tiny", messages=ASK, max_tokens=64, temperature=1.0, n=4, response_format=fmt(FINDING)
            )
            for _ in range(5)
        ]
        free = [c.chat.completions.create(model="tiny", messages=ASK, max_tokens=32, temperature=1.0) for _ in range(3)]
        outs = await asyncio.gather(*constrained, *free)
        await c.close()
        return outs[:5], outs[5:]

    constrained, free = asyncio.run(go())
    texts = [ch.message.content for r in constrained for ch in r.choices]
    assert len(texts) == 20
    for r in constrained:
        assert all(ch.finish_reason == "stop" for ch in r.choices), [ch.message.content for ch in r.choices]
    for t in texts:
        validator.validate(json.loads(t))
    assert len(set(texts)) > 1  # sampled, not one fixed answer
    assert any(not _is_json(ch.message.content) for r in free for ch in r.choices)  # the others stay free


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_json_object_and_streaming(servers):
    c = servers["plain"]["client"]
    classify = fmt(LABEL, "label")
    whole = c.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=64, temperature=0, response_format=classify
    )
    assert json.loads(whole.choices[0].message.content)["label"] in ("benign", "malicious")
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model="tiny", messages=ASK, max_tokens=64, temperature=0, response_format=classify, stream=True
        )
        if ch.choices
    )
    assert streamed == whole.choices[0].message.content
    for _ in range(3):
        r = c.chat.completions.create(
            model="tiny", messages=ASK, max_tokens=64, temperature=1.0, response_format={"type": "json_object"}
        )
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert text.startswith("{") and reason in ("stop", "length")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("template", ["qwen", "llama31"])
def test_forced_tool_call(servers, template):
    """A named tool_choice makes even a random model call that tool with valid arguments."""
    c = servers[template]["client"]
    validator = jsonschema_rs.validator_for(SCAN["function"]["parameters"])
    named = {"type": "function", "function": {"name": "scan_host"}}
    for _ in range(3):
        r = c.chat.completions.create(
            model="tiny", messages=ASK, tools=[SCAN, BLOCK], tool_choice=named, max_tokens=160, temperature=1.0
        )
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls", ch.message
        (call,) = ch.message.tool_calls
        assert call.function.name == "scan_host"
        validator.validate(json.loads(call.function.arguments))
    chunks = list(
        c.chat.completions.create(
            model="tiny", messages=ASK, tools=[SCAN, BLOCK], tool_choice=named, max_tokens=160, stream=True
        )
    )
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas] == ["scan_host"]
    validator.validate(json.loads(deltas[0].function.arguments))
    r = c.chat.completions.create(
        model="tiny", messages=ASK, tools=[SCAN, BLOCK], tool_choice="required", max_tokens=160, temperature=0
    )
    assert r.choices[0].message.tool_calls and r.choices[0].message.tool_calls[0].function.name in (
        "scan_host",
        "block_ip",
    )


def test_refusals(servers):
    url = servers["qwen"]["url"] + "/v1/chat/completions"
    h = {"Authorization": f"Bearer {servers['qwen']['key']}"}
    ok = {"model": "tiny", "messages": ASK, "max_tokens": 4}
    named = {"type": "function", "function": {"name": "scan_host"}}
    cases = [
        {**ok, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
        {**ok, "response_format": {"type": "json_schema"}},
        {**ok, "response_format": {"type": "yaml"}},
        {**ok, "tools": [SCAN], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {**ok, "tools": [SCAN], "tool_choice": named, "response_format": {"type": "json_object"}},
    ]
    for body in cases:
        r = httpx.post(url, headers=h, json=body)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    plain = servers["plain"]  # a template without tools cannot be forced to call one
    r = httpx.post(
        plain["url"] + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {plain['key']}"},
        json={**ok, "tools": [SCAN], "tool_choice": named},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "tools_not_supported"


def test_without_xgrammar_a_clear_error(servers, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import fails as if not installed
    g = Grammars(Tokenizer.from_dir(servers["plain"]["dir"]), 384)
    with pytest.raises(GrammarError, match="xgrammar is not installed"):
        g.json_object()


def test_engine_keeps_a_grammar_state_per_sequence(servers):
    """Two grammars and a free row in one batch, joining at different steps: each row obeys its own."""
    d = servers["plain"]["dir"]
    model, tok = load_model(d), Tokenizer.from_dir(d)
    grammars = Grammars(tok, model.config.vocab_size)
    finding, label = grammars.json_schema(FINDING, True), grammars.json_schema(LABEL, True)
    eng = Engine(model, tok, max_batch=4, max_len=128, max_queue=8)
    eng.start()
    texts, done = {}, threading.Event()
    kinds = ["finding", "label", "free", "finding", "label"]

    def cb(i):
        def on(ev):
            if ev[0] == "delta":
                texts[i] = texts.get(i, "") + ev[1]
            elif ev[0] in ("done", "error"):
                texts.setdefault(i, "")
                texts[f"{i}-end"] = ev
                if sum(k.endswith("-end") for k in texts if isinstance(k, str)) == len(kinds):
                    done.set()

        return on

    p = tok.encode("The quick brown fox", add_special_tokens=True)
    for i, kind in enumerate(kinds):
        g = {"finding": finding, "label": label, "free": None}[kind]
        eng.submit([p], [SeqParams(max_tokens=64, temperature=1.0, seed=i, grammar=g)], [cb(i)])
    assert done.wait(60)
    eng.stop(10)
    for i, kind in enumerate(kinds):
        assert texts[f"{i}-end"][:2] == ("done", "stop") or kind == "free", texts[f"{i}-end"]
        if kind != "free":
            jsonschema_rs.validator_for(FINDING if kind == "finding" else LABEL).validate(json.loads(texts[i]))


def test_control_tokens_never_enter_constrained_text(servers):
    """A JSON string may hold any text, but not a role header or BOS: those ids are masked."""
    tok = Tokenizer.from_dir(servers["plain"]["dir"])
    g = Grammars(tok, 384).json_object()
    c = g.start()
    assert c.matcher.accept_string('{"note": "')
    bitmask = g.xgr.allocate_token_bitmask(1, 384)
    c.matcher.fill_next_token_bitmask(bitmask, 0)
    allowed = lambda i: bool((int(bitmask[0, i // 32]) >> (i % 32)) & 1)  # noqa: E731
    assert allowed(tok.encode("fox")[0])
    for special in ("<|start_header_id|>", "<|begin_of_text|>", "<|eot_id|>"):
        assert not allowed(tok.token_to_id(special)), special
