"""A normalised record (records.py) as token ids and a loss mask: the one rendering that training
(`yunque.train.documents`) and token shards (`shards.py`) use.

    chat                      the tokenizer's chat template (`yunque.chat.render_chat`, with the
                              record's `tools`); targets: the assistant turns (tool calls included)
                              and their end-of-turn token, never the tool results
    completion/classification BOS + prompt + answer + EOS, prompt and answer from
                              `records.prompt_and_answer`; targets: the answer and EOS
    text                      BOS + text + EOS; targets: everything after BOS

Evaluation prompts with the same text (`yunque.evaluate.data`): the chat up to the reply with the
generation prompt, or BOS + the raw prompt, so a model is scored on the prompt it was trained on.
"""

from __future__ import annotations

from yunque.chat import render_chat
from yunque.data.records import prompt_and_answer
from yunque.errors import YunqueError
from yunque.tokenizer import Tokenizer


def encode(
    tok: Tokenizer, rec: dict, *, bos: bool = True, eos: bool = True, train_on_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids and target mask of one record; `train_on_prompt` makes prompts and user turns targets too."""
    if rec["kind"] == "chat":
        r = render_chat(tok, rec["messages"], tools=rec.get("tools"))
        _check_tools_written(tok, rec, r.text)
        return list(r.ids), [True] * len(r.ids) if train_on_prompt else list(r.assistant_mask)
    head = [tok.bos_id] if bos and tok.bos_id is not None else []
    tail = [tok.eos_id] if eos and tok.eos_id is not None else []
    if rec["kind"] == "text":
        body = tok.encode(rec["text"]) + tail
        return head + body, [False] * len(head) + [True] * len(body)
    prompt, answer = prompt_and_answer(rec)
    p, a = head + tok.encode(prompt), tok.encode(answer) + tail
    return p + a, [train_on_prompt] * len(p) + [True] * len(a)


def _check_tools_written(tok: Tokenizer, rec: dict, text: str) -> None:
    """A template without tool support drops `tools` and renders a call as an empty reply: the
    model would learn to say nothing. Every tool and every call must show in the text."""
    names = [c["function"]["name"] for m in rec["messages"] for c in m.get("tool_calls", ())]
    for t in rec.get("tools") or ():
        fn = t.get("function", t)
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    missing = next((n for n in names if n not in text), None)
    if missing is not None:
        raise YunqueError(
            f"the chat template of {tok.source} does not write tools or tool calls ({missing!r} is not in the "
            "rendered chat); use a tokenizer whose template supports tools (Llama 3.1, Qwen2.5, Hermes)"
        )
