"""A normalised record (records.py) as token ids and a loss mask: the one rendering that training
(`yunque.train.documents`) and token shards (`shards.py`) use.

    chat                      the tokenizer's chat template (`yunque.chat.render_chat`); targets: the
                              assistant turns and their end-of-turn token
    completion/classification BOS + prompt + answer + EOS, prompt and answer from
                              `records.prompt_and_answer`; targets: the answer and EOS
    text                      BOS + text + EOS; targets: everything after BOS

Evaluation prompts with the same text (`yunque.evaluate.data`): the chat up to the reply with the
generation prompt, or BOS + the raw prompt, so a model is scored on the prompt it was trained on.
"""

from __future__ import annotations

from yunque.chat import render_chat
from yunque.data.records import prompt_and_answer
from yunque.tokenizer import Tokenizer


def encode(
    tok: Tokenizer, rec: dict, *, bos: bool = True, eos: bool = True, train_on_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids and target mask of one record; `train_on_prompt` makes prompts and user turns targets too."""
    if rec["kind"] == "chat":
        r = render_chat(tok, rec["messages"])
        return list(r.ids), [True] * len(r.ids) if train_on_prompt else list(r.assistant_mask)
    head = [tok.bos_id] if bos and tok.bos_id is not None else []
    tail = [tok.eos_id] if eos and tok.eos_id is not None else []
    if rec["kind"] == "text":
        body = tok.encode(rec["text"]) + tail
        return head + body, [False] * len(head) + [True] * len(body)
    prompt, answer = prompt_and_answer(rec)
    p, a = head + tok.encode(prompt), tok.encode(answer) + tail
    return p + a, [train_on_prompt] * len(p) + [True] * len(a)
