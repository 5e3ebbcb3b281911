"""logprobs / top_logprobs, presence and frequency penalties, per-request seeds, /v1/models/{id}
and streamed usage, through the official `openai` client against a real loopback server."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import torch
from serve_util import build_model_dir, make_server

from yunque.chat import apply_chat_template
from yunque.formats.hf import load_model
from yunque.sampling import penalize_counts
from yunque.serve.logprobs import TokenTexts
from yunque.tokenizer import Tokenizer

MSG = [{"role": "user", "content": "Tell me about the quick brown fox."}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two servers on one model: the output guard off (logprobs stream with their text) and on."""
    tmp = tmp_path_factory.mktemp("serve_lp")
    d = build_model_dir(tmp / "m")
    limits = {"rpm": 10_000, "tpm": 10_000_000}
    off, key, _ = make_server(d, tmp / "off", limits=limits, guards={"output": "off"})
    on, key_on, app_on = make_server(d, tmp / "on", limits=limits)
    with off, on:
        yield {
            "off": openai.OpenAI(base_url=off.url + "/v1", api_key=key, max_retries=0),
            "on": openai.OpenAI(base_url=on.url + "/v1", api_key=key_on, max_retries=0),
            "url": off.url,
            "key": key,
            "app_on": app_on,
            "model": load_model(d),  # a separate copy: the served one has the engine's caches installed
            "tok": Tokenizer.from_dir(d),
        }


def reference(model, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy ids and the log-softmax of every step, one full forward per step (no cache, no batch)."""
    seq, rows = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            lsm = model(torch.tensor([seq]))[0, -1].float().log_softmax(-1)
            rows.append(lsm)
            seq.append(int(lsm.argmax()))
    return seq[len(ids) :], torch.stack(rows)


def chat_ids(tok, messages) -> list[int]:
    return tok.encode(apply_chat_template(tok, messages, add_generation_prompt=True))


def test_chat_logprobs_equal_log_softmax(env):
    model, tok = env["model"], env["tok"]
    r = env["off"].chat.completions.create(
        model="tiny", messages=MSG, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    content = r.choices[0].logprobs.content
    assert 0 < len(content) <= 12
    ids, lsm = reference(model, chat_ids(tok, MSG), len(content))
    for k, e in enumerate(content):
        assert e.logprob == pytest.approx(float(lsm[k, ids[k]]), abs=1e-5)
        top = lsm[k].topk(5).values.tolist()
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top, abs=1e-5)
        assert e.top_logprobs[0].bytes == e.bytes  # greedy: the sampled token is the most likely one
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == r.choices[0].message.content
    # Not asked for: none.
    plain = env["off"].chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_and_streams(env):
    model, tok = env["model"], env["tok"]
    prompt = "The quick brown"
    r = env["off"].completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids, lsm = reference(model, tok.encode(prompt, add_special_tokens=True), len(lp.tokens))
    assert lp.token_logprobs == pytest.approx([float(lsm[k, ids[k]]) for k in range(len(ids))], abs=1e-5)
    for k, top in enumerate(lp.top_logprobs):
        assert max(top.values()) == pytest.approx(float(lsm[k].max()), abs=1e-5) and 1 <= len(top) <= 3
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # Streamed: the same entries, with the text (guard off) or in the choice's last chunk (guard on).
    for name in ("off", "on"):
        chunks = list(
            env[name].completions.create(
                model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=3, stream=True
            )
        )
        got = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
        assert got == pytest.approx(lp.token_logprobs, abs=1e-6), name
        with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs]
        assert len(with_lp) == (1 if name == "on" else len(with_lp)) and with_lp
    chat_whole = env["on"].chat.completions.create(
        model="tiny", messages=MSG, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    streamed = [
        e
        for c in env["off"].chat.completions.create(
            model="tiny", messages=MSG, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in chat_whole.choices[0].logprobs.content])


def test_guard_redaction_withholds_logprobs(env, monkeypatch):
    """Token strings would carry what the guard redacts: a redacted choice has no logprobs."""
    import yunque.serve.engine as eng

    class Scripted:
        def __init__(self, tok, stops):
            self.parts, self.stopped = iter(["Mail bob", "@exam", "ple.com now."]), False

        def add(self, t):
            return next(self.parts, "")

        def flush(self):
            return ""

    monkeypatch.setattr(eng, "TextDecoder", Scripted)
    monkeypatch.setattr(env["app_on"].app.state.engine, "stop_ids", set())
    r = env["on"].chat.completions.create(model="tiny", messages=MSG, max_tokens=5, logprobs=True)
    assert "[EMAIL]" in r.choices[0].message.content and r.choices[0].logprobs is None
    chunks = list(
        env["on"].chat.completions.create(model="tiny", messages=MSG, max_tokens=5, logprobs=True, stream=True)
    )
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)


def test_penalize_counts_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    counts = torch.tensor([[0, 1, 3, 0], [2, 0, 0, 1]])
    out = penalize_counts(logits, counts, torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.25]))
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence, as OpenAI documents
    assert out.tolist() == [[1.0, 2.0 - 0.5 - 1.0, 3.0 - 1.5 - 1.0, 4.0], [2.0 - 0.25, 0.0, 0.0, 1.0 - 0.25]]


@pytest.mark.parametrize("frequency,presence", [(1.5, 0.5), (-1.0, -1.0)])
def test_penalties_pick_the_penalised_argmax(env, frequency, presence):
    """At temperature 0 each token must be the argmax of the raw log-probs minus OpenAI's
    penalties for the tokens sampled before it; and the text differs from the unpenalised one."""
    tok = env["tok"]
    texts = TokenTexts(tok)
    by_bytes = {texts(i)[1]: i for i in range(tok.vocab_size)}
    kw = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 24, "temperature": 0}
    base = env["off"].completions.create(**kw).choices[0].text
    r = env["off"].chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=24,
        temperature=0,
        logprobs=True,
        top_logprobs=20,
        frequency_penalty=frequency,
        presence_penalty=presence,
    )
    counts: dict[int, int] = {}
    for e in r.choices[0].logprobs.content:

        def penalised(i: int, lp: float) -> float:
            c = counts.get(i, 0)
            return lp - c * frequency - (c > 0) * presence

        chosen = penalised(by_bytes[bytes(e.bytes)], e.logprob)
        assert all(chosen >= penalised(by_bytes[bytes(t.bytes)], t.logprob) - 1e-5 for t in e.top_logprobs)
        i = by_bytes[bytes(e.bytes)]
        counts[i] = counts.get(i, 0) + 1
    if frequency > 0:  # repeats made less likely: the greedy text changes (the completions route too)
        plain = env["off"].chat.completions.create(model="tiny", messages=MSG, max_tokens=24, temperature=0)
        assert r.choices[0].message.content != plain.choices[0].message.content
    else:  # repeats made more likely: this greedy completion has none, the penalised one does
        pen = env["off"].completions.create(**kw, presence_penalty=-2.0, frequency_penalty=-2.0).choices[0].text
        assert pen != base


def test_seed_reproducible_under_continuous_batching(env):
    url, key = env["url"], env["key"]
    kw = {"model": "tiny", "messages": MSG, "max_tokens": 16, "temperature": 1.0, "seed": 4242}
    alone = env["off"].chat.completions.create(**kw).choices[0].message.content

    async def crowded():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        others = [
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, temperature=1.0) for _ in range(5)
        ]
        outs = await asyncio.gather(*others[:2], c.chat.completions.create(**kw), *others[2:])
        await c.close()
        return outs[2].choices[0].message.content

    assert asyncio.run(crowded()) == alone
    other_seed = env["off"].chat.completions.create(**{**kw, "seed": 4243}).choices[0].message.content
    assert other_seed != alone


def test_model_by_id_and_streamed_usage(env):
    c = env["off"]
    m = c.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model" and m.owned_by == "yunque"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    chunks = list(
        c.completions.create(
            model="tiny", prompt="dog", max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    no_usage = list(c.completions.create(model="tiny", prompt="dog", max_tokens=5, stream=True))
    assert all(ch.usage is None for ch in no_usage)


def test_new_fields_are_validated(env):
    import httpx

    url, h = env["url"] + "/v1", {"Authorization": f"Bearer {env['key']}"}
    ok = {"model": "tiny", "messages": MSG, "max_tokens": 2}
    bad = [
        ("chat/completions", {**ok, "top_logprobs": 3}),  # needs logprobs: true
        ("chat/completions", {**ok, "logprobs": True, "top_logprobs": 21}),
        ("chat/completions", {**ok, "presence_penalty": 2.5}),
        ("chat/completions", {**ok, "frequency_penalty": -3}),
        ("chat/completions", {**ok, "logprobs": 1}),  # strict: a bool, not a number
        ("completions", {"model": "tiny", "prompt": "x", "logprobs": 6}),
        ("completions", {"model": "tiny", "prompt": "x", "echo": True}),
        ("completions", {"model": "tiny", "prompt": "x", "logprobz": 1}),
    ]
    for path, body in bad:
        r = httpx.post(f"{url}/{path}", headers=h, json=body)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{url}/chat/completions", headers=h, json={**ok, "presence_penalty": 0.5, "logprobs": False})
    assert r.status_code == 200 and json.loads(r.text)["choices"][0]["logprobs"] is None
