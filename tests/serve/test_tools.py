"""Function calling: tools rendered through the model's own template, calls parsed from the
text (Hermes/Qwen `<tool_call>` and Llama 3.1 JSON) into `tool_calls` and `delta.tool_calls`,
tool results accepted on the next turn, and a clear 400 for a template without tools.

A random tiny model does not call tools by itself: the engine's text decoder is replaced by one
that "says" a scripted reply, so these tests check the server, not the model."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from serve_util import build_model_dir, make_server
from tok_chat_templates import LLAMA31, QWEN25

from yunque.chat import apply_chat_template
from yunque.serve.tools import ToolStream, parse
from yunque.tokenizer import Tokenizer

SCAN = {
    "type": "function",
    "function": {
        "name": "scan_host",
        "description": "Run the vulnerability scanner against one host",
        "parameters": {"type": "object", "properties": {"host": {"type": "string"}}, "required": ["host"]},
    },
}
ASK = [{"role": "user", "content": "Is web01 vulnerable?"}]
HERMES_CALL = '<tool_call>\n{"name": "scan_host", "arguments": {"host": "web01"}}\n</tool_call>'

# A template that lists tools writes a long system turn: ~700 tokens of the tiny BPE.
LIMITS = {"rpm": 10_000, "tpm": 10_000_000, "max_len": 1024, "max_prompt_tokens": 960}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_tools")
    plain = build_model_dir(tmp / "plain")  # yunque's Llama 3 template: no tool support
    dirs = {"plain": plain}
    for name, template in (("qwen", QWEN25), ("llama31", LLAMA31)):
        d = tmp / name
        shutil.copytree(plain, d)
        (d / "chat_template.jinja").write_text(template, encoding="utf-8")
        dirs[name] = d
    running, out = [], {}
    for name, d in dirs.items():
        srv, key, app = make_server(d, tmp / f"run_{name}", limits=LIMITS)
        srv.__enter__()
        running.append(srv)
        out[name] = {
            "client": openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0),
            "app": app,
            "url": srv.url,
            "key": key,
            "tok": Tokenizer.from_dir(d),
        }
    yield out
    for srv in running:
        srv.__exit__(None, None, None)


def script(monkeypatch, app, parts: list[str]) -> int:
    """Make the served model say `parts` (one per token); the max_tokens that lets it finish."""
    import yunque.serve.engine as eng

    class Scripted:
        def __init__(self, tok, stops):
            self.parts, self.stopped = iter(parts), False

        def add(self, t):
            return next(self.parts, "")

        def flush(self):
            return ""

    monkeypatch.setattr(eng, "TextDecoder", Scripted)
    monkeypatch.setattr(app.app.state.engine, "stop_ids", set())
    return len(parts)


def test_parse_formats():
    names = ["scan_host", "lookup"]
    content, calls = parse("Checking. " + HERMES_CALL + "\n" + HERMES_CALL.replace("web01", "db02"), names)
    assert content.strip() == "Checking." and len(calls) == 2
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"host": "web01"}, {"host": "db02"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    llama = '{"name": "scan_host", "parameters": {"host": "web01"}}'
    assert parse(llama, names)[1][0]["function"] == {"name": "scan_host", "arguments": '{"host": "web01"}'}
    assert len(parse(f"[{llama}, {llama}]", names)[1]) == 2
    stringly = '<tool_call>{"name": "lookup", "arguments": "{\\"q\\": 1}"}</tool_call>'
    assert json.loads(parse(stringly, names)[1][0]["function"]["arguments"]) == {"q": 1}
    for text in (
        '{"name": "rm_rf", "parameters": {}}',  # not one of the request's tools
        '{"answer": 42}',  # a JSON answer, not a call
        '<tool_call>{"name": "scan_host", "arguments": [1]}</tool_call>',  # arguments not an object
        "<tool_call>{not json</tool_call>",
        '{"name": ["scan_host"], "parameters": {}}',  # a name that is not a string
        "[" * 5000 + "]" * 5000,  # deeper than the recursion limit
        '{"name": "scan_host", "parameters": ' + "[" * 5000 + "]" * 5000 + "}",
        "plain words",
    ):
        assert parse(text, names) == (text, []), text
    two = HERMES_CALL + HERMES_CALL.replace("web01", "db02")
    content, calls = parse(two, names, one=True)  # parallel_tool_calls: false
    assert len(calls) == 1 and content == HERMES_CALL.replace("web01", "db02")
    unclosed = '<tool_call>{"name": "lookup", "arguments": {}}'  # stopped at end-of-turn before the tag
    assert parse(unclosed, names)[1][0]["function"]["name"] == "lookup"


def test_tool_stream_holds_back_only_what_may_be_a_call():
    s = ToolStream(["scan_host"])
    assert s.feed("Let me check. <tool") == "Let me check. "
    assert s.feed("_call>\n{") == ""
    assert s.feed('"name": "scan_host", "arguments": {"host": "web01"}}\n</tool_call>') == ""
    rest, calls = s.finish()
    assert rest == "" and calls[0]["function"]["name"] == "scan_host"
    s = ToolStream(["scan_host"])
    assert s.feed("a < b and <tool_") == "a < b and "
    assert s.feed("box") == "<tool_box"  # not a tag after all: out it goes
    assert s.finish() == ("", [])
    s = ToolStream(["scan_host"])  # a reply opening with "{" may be a Llama-style call: all held
    assert s.feed('  {"name": "scan_host", ') == "" and s.feed('"parameters": {}}') == ""
    assert s.finish()[1][0]["function"]["arguments"] == "{}"


def test_hermes_round_trip(servers, monkeypatch):
    q = servers["qwen"]
    c = q["client"]
    n = script(
        monkeypatch,
        q["app"],
        ["Checking. ", "<tool_call>", '\n{"name": "scan_host", ', '"arguments": {"host": "web01"}}', "\n</tool_call>"],
    )
    r = c.chat.completions.create(model="tiny", messages=ASK, tools=[SCAN], max_tokens=n)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "scan_host"
    assert json.loads(call.function.arguments) == {"host": "web01"}
    # The prompt was the template's own rendering with the tools in it.
    tok = q["tok"]
    with_tools = apply_chat_template(tok, ASK, add_generation_prompt=True, tools=[SCAN])
    assert "<tools>" in with_tools and r.usage.prompt_tokens == len(tok.encode(with_tools))

    chunks = list(c.chat.completions.create(model="tiny", messages=ASK, tools=[SCAN], max_tokens=n, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert text.strip() == "Checking." and "<tool_call>" not in text
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].id.startswith("call_")
    assert deltas[0].function.name == "scan_host" and json.loads(deltas[0].function.arguments) == {"host": "web01"}
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        "tool_calls"
    ]

    # Next turn: the assistant's call and the tool's result go back through the template.
    monkeypatch.undo()
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"open_ports": [22, 443], "cves": []}'},
    ]
    r2 = c.chat.completions.create(model="tiny", messages=history, tools=[SCAN], max_tokens=4, temperature=0)
    plain = [dict(m) for m in history]
    plain[1] = {
        **plain[1],
        "tool_calls": [{**call.model_dump(), "function": {"name": "scan_host", "arguments": {"host": "web01"}}}],
    }
    rendered = apply_chat_template(
        tok, [{**m, "content": m["content"] or ""} for m in plain], add_generation_prompt=True, tools=[SCAN]
    )
    assert "<tool_response>" in rendered and '"open_ports"' in rendered and '"host": "web01"' in rendered
    assert r2.usage.prompt_tokens == len(tok.encode(rendered))


def test_llama31_json_format(servers, monkeypatch):
    L = servers["llama31"]
    n = script(monkeypatch, L["app"], ['{"name": "scan_host", ', '"parameters": {"host": "web01"}}'])
    r = L["client"].chat.completions.create(model="tiny", messages=ASK, tools=[SCAN], max_tokens=n)
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.arguments == '{"host": "web01"}'
    chunks = list(
        L["client"].chat.completions.create(model="tiny", messages=ASK, tools=[SCAN], max_tokens=n, stream=True)
    )
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert [tc.function.name for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []] == [
        "scan_host"
    ]
    # A plain answer stays text, streamed or not.
    n = script(monkeypatch, L["app"], ["No ", "call ", "needed."])
    r = L["client"].chat.completions.create(model="tiny", messages=ASK, tools=[SCAN], max_tokens=n)
    assert r.choices[0].message.content == "No call needed." and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "length"


def test_tool_choice_none_and_templates_without_tools(servers, monkeypatch):
    p = servers["plain"]
    with pytest.raises(openai.BadRequestError) as e:
        p["client"].chat.completions.create(model="tiny", messages=ASK, tools=[SCAN], max_tokens=2)
    assert e.value.body["code"] == "tools_not_supported" and e.value.body["param"] == "tools"
    history = ASK + [
        {
            "role": "assistant",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "scan_host", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    with pytest.raises(openai.BadRequestError) as e:
        p["client"].chat.completions.create(model="tiny", messages=history, max_tokens=2)
    assert e.value.body["code"] == "tools_not_supported"
    # tool_choice "none": the tools stay out of the prompt, so any template will do, and nothing is parsed.
    r = p["client"].chat.completions.create(model="tiny", messages=ASK, tools=[SCAN], tool_choice="none", max_tokens=2)
    assert r.choices[0].message.tool_calls is None
    q = servers["qwen"]
    n = script(monkeypatch, q["app"], [HERMES_CALL])
    r = q["client"].chat.completions.create(model="tiny", messages=ASK, tools=[SCAN], tool_choice="none", max_tokens=n)
    assert r.choices[0].message.content == HERMES_CALL and r.choices[0].message.tool_calls is None
    tok = q["tok"]
    assert r.usage.prompt_tokens == len(tok.encode(apply_chat_template(tok, ASK, add_generation_prompt=True)))


def test_tool_fields_are_validated(servers):
    url = servers["qwen"]["url"] + "/v1/chat/completions"
    h = {"Authorization": f"Bearer {servers['qwen']['key']}"}
    ok = {"model": "tiny", "messages": ASK, "tools": [SCAN], "max_tokens": 2}
    call = {"id": "call_1", "type": "function", "function": {"name": "scan_host", "arguments": "{}"}}
    bad = [
        {**ok, "tool_choice": "sometimes"},
        {**ok, "tools": [{"type": "retrieval"}]},
        {**ok, "tools": [{**SCAN, "function": {**SCAN["function"], "name": "bad name!"}}]},
        {**ok, "tools": [{**SCAN, "extra": 1}]},
        {"model": "tiny", "messages": ASK, "tool_choice": "auto"},  # tool_choice without tools
        {**ok, "messages": ASK + [{"role": "tool", "content": "x"}]},  # no tool_call_id
        {**ok, "messages": [{"role": "user", "content": "x", "tool_calls": [call]}]},
        {
            **ok,
            "messages": ASK
            + [{"role": "assistant", "tool_calls": [{**call, "function": {"name": "scan_host", "arguments": "[1]"}}]}],
        },
        {
            **ok,
            "messages": ASK
            + [
                {"role": "assistant", "tool_calls": [{**call, "function": {"name": "scan_host", "arguments": "{oops"}}]}
            ],
        },
    ]
    for body in bad:
        r = httpx.post(url, headers=h, json=body)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url, headers=h, json={**ok, "tool_choice": "auto", "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
