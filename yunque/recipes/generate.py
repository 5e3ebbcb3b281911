"""`yunque generate` and `yunque chat`: a model directory in, streamed text out."""

from __future__ import annotations

import sys
import time

from yunque.chat_input import HELP, MessageReader
from yunque.errors import YunqueError
from yunque.generate import Sampling, stream_text
from yunque.inference import load
from yunque.threads import fit_threads


def _sampling(tok, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop) -> Sampling:
    for name, value, ok in (
        ("--max-new-tokens", max_new_tokens, max_new_tokens > 0),
        ("--temperature", temperature, temperature >= 0),
        ("--top-k", top_k, top_k >= 0),
        ("--top-p", top_p, 0 < top_p <= 1),
        ("--repetition-penalty", repetition_penalty, repetition_penalty > 0),
    ):
        if not ok:
            raise YunqueError(f"{name} {value} is out of range")
    return Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_ids=tuple(tok.stop_ids),
        stop_strings=tuple(stop),
    )


def _chat_ids(tok, messages: list[dict]) -> list[int]:
    from yunque.chat import render_chat

    if not tok.chat_template:
        raise YunqueError("this tokenizer has no chat_template; use it without --chat")
    return render_chat(tok, messages, add_generation_prompt=True).ids


def generate_cmd(
    *,
    model: str,
    prompt: str,
    adapter: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    system: str | None = None,
    stop: list[str] = (),
    dtype: str = "auto",
    device: str = "auto",
    stats: bool = False,
) -> int:
    """Complete a prompt and print the completion as it is generated.

    Args:
        prompt: the prompt text
        model: a Hugging Face model directory (with tokenizer.json)
        adapter: a PEFT adapter directory to apply
        max_new_tokens: most tokens to generate
        temperature: 0 for greedy decoding
        top_k: sample among the k most likely tokens (0: off)
        top_p: nucleus sampling mass
        repetition_penalty: above 1 discourages repeating tokens
        seed: random seed for sampling
        chat: render the prompt as a user message through the model's chat template
        system: system message (with --chat)
        stop: strings that end the completion
        dtype: auto, float32, bfloat16 or float16
        device: auto, cpu or cuda
        stats: print tokens/s to stderr
    """
    m, tok = load(model, adapter, dtype, device)
    fit_threads(m)  # on CPU: the cores other processes leave free
    s = _sampling(tok, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = _chat_ids(tok, msgs)
    else:
        ids = tok.encode(prompt, add_special_tokens=True)
    t0, n = time.perf_counter(), 0
    for delta in stream_text(m, tok, ids, s):
        sys.stdout.write(delta)
        sys.stdout.flush()
        n += 1
    sys.stdout.write("\n")
    if stats:
        dt = time.perf_counter() - t0
        print(f"[{n} chunks in {dt:.2f}s]", file=sys.stderr)
    return 0


def chat_cmd(
    model: str | None = None,
    url: str | None = None,
    api_key: str | None = None,
    adapter: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
) -> int:
    """Interactive chat with streaming output (a local model, or a running `yunque serve` via --url).

    A message may span lines: paste it, end a line with \\ to go on, or put \"\"\" on its own line before and after.

    Args:
        model: a Hugging Face model directory
        url: base URL of an OpenAI-compatible server instead of a local model
        api_key: API key for --url (default: $YUNQUE_API_KEY)
        adapter: a PEFT adapter directory to apply to --model
        system: system message
        max_new_tokens: most tokens per answer
        temperature: sampling temperature (0: greedy)
        top_p: nucleus sampling mass
        seed: random seed
        dtype: auto, float32, bfloat16 or float16
        device: auto, cpu or cuda
    """
    if (model is None) == (url is None):
        raise YunqueError("give exactly one of --model DIR or --url URL")
    if url is not None:
        from yunque.serve.client import chat_remote

        return chat_remote(
            url, api_key, system=system, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
    m, tok = load(model, adapter, dtype, device)
    fit_threads(m)  # on CPU: the cores other processes leave free
    s = _sampling(tok, max_new_tokens, temperature, 0, top_p, 1.0, seed, ())
    messages = [{"role": "system", "content": system}] if system else []
    print(f"yunque chat: empty line or Ctrl-D to quit, /reset to forget the conversation.\n{HELP}", file=sys.stderr)
    reader = MessageReader(prompt="you> ")
    while True:
        text = reader.read()
        if not text:
            if text is None:
                print()
            return 0
        if text == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": text})
        sys.stdout.write("assistant> ")
        reply = []
        for delta in stream_text(m, tok, _chat_ids(tok, messages), s):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
