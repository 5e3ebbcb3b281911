"""The agent frameworks people point at an OpenAI-compatible server: a LangChain agent
(`langchain-openai`'s ChatOpenAI in `create_agent`) that calls a fake vulnerability scanner and
answers with its findings, and litellm's `completion(..., tools=...)` through a tool round trip.

The model is tiny and random, so it calls no tool by itself: the tool call is forced with
`tool_choice` (the server's grammar makes it a valid call), and the turn after the tool result
is plain text (`tool_choice: "none"`). The tests check that the clients and the server agree on
the wire format, not the model. The packages come with the dev extra; without them these tests
skip, saying which is missing."""

from __future__ import annotations

import json
import os
from typing import Literal  # at module level: the tool's annotations are resolved in this module's globals

import pytest
from serve_util import build_model_dir, make_server
from tok_chat_templates import QWEN25

pytest.importorskip("xgrammar", reason="xgrammar is not installed (install.sh installs it): no forced tool calls")

ASK = "Is web01 vulnerable? Scan it."
HOSTS = ["web01", "db02"]
SCAN = {
    "type": "function",
    "function": {
        "name": "scan_host",
        "description": "Run the vulnerability scanner against one host and return its findings",
        "parameters": {
            "type": "object",
            "properties": {"host": {"enum": HOSTS}, "deep": {"type": "boolean"}},
            "required": ["host", "deep"],
            "additionalProperties": False,
        },
    },
}
FINDINGS = {"open_ports": [22, 443], "findings": [{"cve": "CVE-2024-6387", "severity": "high"}]}
# A template that lists tools writes a long system turn (the tiny BPE spells it nearly byte by byte).
LIMITS = {"rpm": 10_000, "tpm": 10_000_000, "max_len": 2048, "max_prompt_tokens": 1800, "max_tokens": 160}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    model = build_model_dir(tmp / "m", context=2048)
    (model / "chat_template.jinja").write_text(QWEN25, encoding="utf-8")  # Qwen2.5's: Hermes-style tool calls
    srv, key, _ = make_server(model, tmp, limits=LIMITS)
    with srv:
        yield srv.url + "/v1", key


def scan(host: str, deep: bool) -> str:
    return json.dumps({"host": host, "deep": deep, **FINDINGS})


def test_langchain_agent_calls_the_scanner(server):
    pytest.importorskip("langchain_openai", reason="langchain-openai is not installed (the dev extra installs it)")
    agents = pytest.importorskip("langchain.agents", reason="langchain is not installed (the dev extra installs it)")
    from langchain.agents.middleware import wrap_model_call
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    url, key = server
    scans = []

    @tool
    def scan_host(host: Literal["web01", "db02"], deep: bool) -> str:
        """Run the vulnerability scanner against one host and return its findings."""
        scans.append((host, deep))
        return scan(host, deep)

    @wrap_model_call
    def scan_first(request, handler):
        # The first turn must call the scanner; once its result is in, the model answers in text.
        scanned = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if scanned else "scan_host"))

    llm = ChatOpenAI(model="tiny", base_url=url, api_key=key, max_retries=0, temperature=0, max_tokens=160)
    agent = agents.create_agent(llm, tools=[scan_host], middleware=[scan_first], system_prompt="You triage hosts.")
    out = agent.invoke({"messages": [{"role": "user", "content": ASK}]})

    assert len(scans) == 1 and scans[0][0] in HOSTS and isinstance(scans[0][1], bool), scans
    kinds = [type(m).__name__ for m in out["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"], kinds
    call_msg, result, answer = out["messages"][1:]
    assert [c["name"] for c in call_msg.tool_calls] == ["scan_host"]
    assert call_msg.tool_calls[0]["args"] == {"host": scans[0][0], "deep": scans[0][1]}
    assert result.tool_call_id == call_msg.tool_calls[0]["id"] and "CVE-2024-6387" in result.content
    assert isinstance(answer, AIMessage) and not answer.tool_calls
    assert answer.response_metadata["finish_reason"] in ("stop", "length")


@pytest.mark.filterwarnings("ignore:.*ReadOnly. qualifier:UserWarning")  # litellm's own TypedDicts, at import
def test_litellm_completion_with_tools(server):
    # litellm fetches its model price list from the internet at import unless told to use its own copy
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm", reason="litellm is not installed (the dev extra installs it)")
    url, key = server
    kw = {"model": "openai/tiny", "api_base": url, "api_key": key, "max_tokens": 160, "temperature": 0}
    messages = [{"role": "user", "content": ASK}]
    named = {"type": "function", "function": {"name": "scan_host"}}

    r = litellm.completion(messages=messages, tools=[SCAN], tool_choice=named, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "scan_host" and args["host"] in HOSTS and isinstance(args["deep"], bool), args

    # streamed, and put back together by litellm
    chunks = list(litellm.completion(messages=messages, tools=[SCAN], tool_choice=named, stream=True, **kw))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=messages)
    (streamed,) = rebuilt.choices[0].message.tool_calls
    assert streamed.function.name == "scan_host" and json.loads(streamed.function.arguments)["host"] in HOSTS

    # the tool's result goes back as a `tool` message; the answer is text
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": scan(args["host"], args["deep"])},
    ]
    r = litellm.completion(messages=messages, tools=[SCAN], tool_choice="none", **kw)
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
