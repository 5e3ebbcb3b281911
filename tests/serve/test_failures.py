"""Failures stay small: non-finite weights are refused at load, a request whose generation fails
gets a 500 while the others go on, a dead engine thread is restarted (and past its budget the
server exits non-zero, /ready saying why), and a client that leaves mid-stream is charged and
audited for what was generated."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading
import time

import httpx
import pytest
import torch
from serve_util import build_model_dir, free_port, make_server

import yunque.serve.service as service_mod
from yunque.errors import CheckpointError, YunqueError

MSG = [{"role": "user", "content": "Tell me about the quick brown fox."}]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("failures"))


def test_nonfinite_weights_are_refused_at_load(model_dir, tmp_path, capsys):
    from yunque.__main__ import main
    from yunque.formats.hf import load_model, save_model
    from yunque.inference import load

    bad = tmp_path / "nan-model"
    shutil.copytree(model_dir, bad)
    model = load_model(bad)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    save_model(model, bad, allow_nonfinite=True)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight holds 2 non-finite"):
        load(bad)
    load(bad, allow_nonfinite=True)  # the escape hatch
    load(model_dir)

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"auth:\n  required: false\n  keys_file: {tmp_path / 'k.json'}\n")
    assert main(["serve", "--model", str(bad), "--config", str(cfg), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.1.mlp.up_proj.weight" in err[0] and "--allow-nonfinite" in err[0], err


def poison(app, text: str) -> None:
    """NaN in the input embedding of `text`'s one token: a prompt holding it gets NaN logits, the
    others do not (rows are independent). The output head is untied first, so that its copy of the
    row does not make every request's logits NaN, and the token is never sampled: a healthy request
    that sampled it would feed it back and fail too (a random model samples it now and then)."""
    engine = app.app.state.engine
    model, tok = engine.model, engine.tok
    [tid] = tok.encode(text)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.model.embed_tokens.weight[tid] = float("nan")

    def never_sample(module, args, logits):
        logits[..., tid] = -1e4  # finite, so that a healthy row still reads as finite
        return logits

    model.lm_head.register_forward_hook(never_sample)
    assert tid not in tok.encode("Tell me about the quick brown fox.")


def test_a_nan_fails_its_own_request_only(model_dir, tmp_path):
    srv, key, app = make_server(model_dir, tmp_path, limits={"rpm": 10_000})
    poison(app, "Q")
    h = {"Authorization": f"Bearer {key}"}
    url = srv.url + "/v1/chat/completions"
    bad = {"model": "tiny", "messages": [{"role": "user", "content": "Q"}], "max_tokens": 8, "temperature": 0.8}
    good = {"model": "tiny", "messages": MSG, "max_tokens": 8, "temperature": 0.8}
    with srv:

        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*[c.post(url, headers=h, json=b) for b in (good, bad, good, bad, good)])

        rs = asyncio.run(burst())
        assert [r.status_code for r in rs] == [200, 500, 200, 500, 200], [r.text for r in rs]
        err = rs[1].json()["error"]
        assert set(err) == ERROR_KEYS and err["type"] == "server_error" and err["code"] == "engine_error"
        assert "non-finite" in err["message"]
        with httpx.stream("POST", url, headers=h, json={**bad, "stream": True}) as r:  # streamed: reported in-band
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln]
        assert json.loads(lines[-1][6:])["error"]["code"] == "engine_error" and "[DONE]" not in lines[-1]
        # the engine is alive and well: more requests, and /health
        assert httpx.post(url, headers=h, json=good, timeout=60).status_code == 200
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "engine_restarts": 0}
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    failed = [x for x in lines if x["outcome"] == "failed"]
    assert len(failed) == 3 and all(x["status"] == 500 for x in failed)
    assert sum(x["outcome"] == "ok" for x in lines) == 4


def test_a_nan_leaves_nothing_behind_in_the_cache(model_dir, tmp_path):
    """A failed sequence's cache row is cleared: the next sequence in that row attends (with
    weight 0) to slots past its own length while a longer row shares the batch, and 0 x NaN is NaN."""
    srv, key, app = make_server(model_dir, tmp_path, limits={"rpm": 10_000, "max_batch": 2}, slow_s=0.02)
    poison(app, "Q")
    engine = app.app.state.engine
    engine.stop_ids = set()
    h = {"Authorization": f"Bearer {key}"}
    url = srv.url + "/v1/chat/completions"
    with srv:

        async def run():
            async with httpx.AsyncClient(timeout=60) as c:
                long = asyncio.create_task(
                    c.post(url, headers=h, json={"model": "tiny", "messages": MSG, "max_tokens": 60})
                )
                while engine.n_running == 0:
                    await asyncio.sleep(0.01)
                bad = await c.post(
                    url,
                    headers=h,
                    json={
                        "model": "tiny",
                        "max_tokens": 4,
                        "messages": [{"role": "user", "content": "Q " + "fox " * 40}],
                    },
                )
                after = await c.post(
                    url,
                    headers=h,
                    json={
                        "model": "tiny",
                        "max_tokens": 20,
                        "temperature": 0.8,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                return await long, bad, after

        long, bad, after = asyncio.run(run())
    assert bad.status_code == 500
    assert long.status_code == 200 and after.status_code == 200, (long.text, after.text)


def test_a_dead_engine_is_restarted_then_the_server_gives_up(model_dir, tmp_path, monkeypatch):
    """A failure outside any one step ends the engine thread: its requests get a 500, the thread
    is started again; once it has died more than `_MAX_RESTARTS` times the server stops (run_server
    raises, exit code 1), and meanwhile /ready is 503 (/health 200, the process is alive) with the
    reason and requests get 503."""
    from yunque.config import from_dict
    from yunque.serve import ServeConfig, build_app
    from yunque.serve.auth import create_key
    from yunque.serve.server import run_server

    monkeypatch.setattr(service_mod, "_MAX_RESTARTS", 2)
    key = create_key(tmp_path / "keys.json", "t")
    cfg = from_dict(
        ServeConfig,
        {
            "limits": {
                "max_len": 256,
                "max_prompt_tokens": 192,
                "max_tokens": 16,
                "default_max_tokens": 8,
                "rpm": 1000,
            },
            "auth": {"keys_file": str(tmp_path / "keys.json")},
            "drain_timeout_s": 5,
        },
    )
    from yunque.formats.hf import load_model
    from yunque.tokenizer import Tokenizer

    app = build_app(load_model(model_dir), Tokenizer.from_dir(model_dir), cfg, "tiny")
    engine = app.app.state.engine
    admit, fails = engine._admit, [1]

    def flaky_admit():
        if fails[0] > 0:
            fails[0] -= 1
            raise RuntimeError("bookkeeping bug")
        return admit()

    engine._admit = flaky_admit
    port = free_port()
    outcome = {}

    def serve():
        try:
            run_server(app, "127.0.0.1", port, cfg, log_level="warning")
            outcome["rc"] = 0
        except YunqueError as e:
            outcome["rc"], outcome["msg"] = e.exit_code, str(e)

    monkeypatch.setattr(sys, "setswitchinterval", lambda s: None)  # run_server's tuning is for a process of its own
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    url, h = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    body = {"model": "tiny", "messages": MSG, "max_tokens": 4}
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url + "/health")
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    r = httpx.post(url + "/v1/chat/completions", headers=h, json=body, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    time.sleep(0.2)  # the restart is scheduled on the event loop
    assert httpx.get(url + "/health").json() == {"status": "ok", "engine_restarts": 1}
    assert httpx.post(url + "/v1/chat/completions", headers=h, json=body, timeout=30).status_code == 200

    fails[0] = 10**9  # from now on it dies every time: restart 2, then give up
    seen = []
    while t.is_alive() and time.monotonic() < deadline + 30:
        try:
            r = httpx.post(url + "/v1/chat/completions", headers=h, json=body, timeout=30)
            seen.append(r.status_code)
            ready = httpx.get(url + "/ready")
            if ready.status_code == 503:
                seen.append(ready.json())
                assert httpx.get(url + "/health").status_code == 200
        except httpx.TransportError:
            pass  # the server is shutting down
        time.sleep(0.05)
    t.join(30)
    assert outcome.get("rc") == 1 and "the engine failed 3 times" in outcome["msg"], outcome
    assert 500 in seen and set(x for x in seen if isinstance(x, int)) <= {500, 503}, seen
    down = [x for x in seen if isinstance(x, dict)]
    if down:  # the window between giving up and the socket closing is short; when caught, it says why
        assert down[0]["status"] == "engine_failed" and "RuntimeError: bookkeeping bug" in down[0]["error"], down


def test_client_leaving_mid_stream_is_charged_for_what_was_generated(model_dir, tmp_path):
    """Tokens per minute, the audit line and yunque_completion_tokens_total count the tokens
    generated before the client hung up (they counted 0, and the whole reservation came back)."""
    srv, key, app = make_server(
        model_dir, tmp_path, limits={"rpm": 1000, "tpm": 5000}, slow_s=0.03, guards={"holdback": 4}
    )
    engine, limiter = app.app.state.engine, app.app.state.limiter
    engine.stop_ids = set()  # the random model must not end its answer before the client leaves
    limiter.clock = lambda: 1000.0  # no refill during the test: the bucket shows exactly what was charged
    h = {"Authorization": f"Bearer {key}"}
    body = {"model": "tiny", "messages": MSG, "max_tokens": 60, "stream": True}
    with srv:
        chunks = 0
        with httpx.stream("POST", srv.url + "/v1/chat/completions", headers=h, json=body) as r:
            for line in r.iter_lines():
                chunks += '"content":"' in line
                if chunks >= 5:
                    break
        t0 = time.monotonic()
        while engine.n_running and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        time.sleep(0.3)
        metrics = httpx.get(srv.url + "/metrics", headers=h).text
    line = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines() if '"chat"' in x][-1]
    assert line["outcome"] == "cancelled" and line["completion_tokens"] >= 5, line
    assert line["completion_tokens"] < 60
    assert f"yunque_completion_tokens_total {float(line['completion_tokens'])}" in metrics
    bucket = limiter._buckets["tester"][1]
    assert bucket.level == 5000 - line["prompt_tokens"] - line["completion_tokens"]
