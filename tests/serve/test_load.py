"""Load, rate limits, admission control, client disconnects and SIGTERM draining on a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from serve_util import build_model_dir, free_port, make_server

from yunque.serve.auth import create_key

MSG = [{"role": "user", "content": "Tell me about the quick brown fox."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("load"))


async def stream_chat(client: httpx.AsyncClient, url: str, key: str, max_tokens: int) -> dict:
    body = {"model": "tiny", "messages": MSG, "max_tokens": max_tokens, "stream": True, "temperature": 0.8}
    try:
        return await _stream_chat(client, url, key, body)
    except httpx.HTTPError as e:  # reported in the test's assertion, with its type
        return {"status": type(e).__name__, "error": str(e)}


async def _stream_chat(client: httpx.AsyncClient, url: str, key: str, body: dict) -> dict:
    async with client.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "body": (await r.aread()).decode()}
        lines = [ln async for ln in r.aiter_lines() if ln]
    finish = [json.loads(ln[6:])["choices"][0]["finish_reason"] for ln in lines[:-1]]
    return {"status": 200, "done": lines[-1] == "data: [DONE]", "finish": [f for f in finish if f]}


@pytest.mark.slow
def test_64_concurrent_streaming_clients(model_dir, tmp_path):
    srv, key, _ = make_server(model_dir, tmp_path, limits={"max_batch": 16, "rpm": 10_000, "tpm": 10_000_000})

    async def client_loop(client, url):
        return [await stream_chat(client, url, key, 8) for _ in range(4)]

    async def go(url):
        # Idle connections expire client-side before uvicorn's 5 s keep-alive closes them, else a reused
        # connection can race the server's close (ReadError): the standard client-side practice.
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            return await asyncio.gather(*[client_loop(client, url) for _ in range(64)])

    with srv:
        t0 = time.monotonic()
        results = [r for per_client in asyncio.run(go(srv.url)) for r in per_client]
        elapsed = time.monotonic() - t0
        metrics = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    assert len(results) == 256
    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200][:3]
    assert all(r["done"] and len(r["finish"]) == 1 and r["finish"][0] in ("stop", "length") for r in results)
    assert 'yunque_requests_total{route="chat",status="200"} 256.0' in metrics
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 256 and all(json.loads(x)["outcome"] == "ok" for x in lines)
    print(f"256 streams in {elapsed:.1f}s")


def test_rate_limits_are_exact(model_dir, tmp_path):
    srv, _, _ = make_server(model_dir, tmp_path)
    keys = tmp_path / "keys.json"
    five = create_key(keys, "five", rpm=5)
    with srv, httpx.Client() as c:  # one client: a fresh one per call spends ~0.1 s building an SSL context
        h = {"Authorization": f"Bearer {five}"}
        codes = [c.get(srv.url + "/v1/models", headers=h).status_code for _ in range(5)]
        assert codes == [200] * 5  # non-generation routes are not rate limited
        body = {"model": "tiny", "messages": MSG, "max_tokens": 2}
        rs = [c.post(srv.url + "/v1/chat/completions", headers=h, json=body) for _ in range(7)]
        assert [r.status_code for r in rs] == [200] * 5 + [429, 429]
        r = rs[5]
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
        assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert rs[0].headers["x-ratelimit-remaining-requests"] == "4"
        # tokens per minute: exactly one request of prompt + max_tokens fits
        prompt = rs[0].json()["usage"]["prompt_tokens"]
        tkey = create_key(keys, "tokens", tpm=prompt + 2)
        h = {"Authorization": f"Bearer {tkey}"}
        assert c.post(srv.url + "/v1/chat/completions", headers=h, json=body).status_code == 200
        r = c.post(srv.url + "/v1/chat/completions", headers=h, json=body)
        assert r.status_code == 429 and r.json()["error"]["type"] == "tokens" and "retry-after" in r.headers
        r = c.post(srv.url + "/v1/chat/completions", headers=h, json={**body, "max_tokens": 50})
        assert r.status_code == 400 and r.json()["error"]["code"] == "tokens_exceed_limit"  # could never fit: no retry


def test_overload_and_disconnect_cancel(model_dir, tmp_path):
    srv, key, app = make_server(
        model_dir, tmp_path, limits={"max_batch": 1, "max_queue": 1, "rpm": 1000}, slow_s=0.03, guards={"holdback": 4}
    )  # text must flow before the client hangs up
    engine = app.app.state.engine
    engine.stop_ids = set()  # the random model must not end a sequence (EOS) before the client leaves
    h = {"Authorization": f"Bearer {key}"}
    with srv:

        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                body = {"model": "tiny", "messages": MSG, "max_tokens": 5}
                return await asyncio.gather(
                    *[c.post(srv.url + "/v1/chat/completions", headers=h, json=body) for _ in range(5)]
                )

        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and set(codes) <= {200, 429}, codes
        over = next(r for r in rs if r.status_code == 429)
        assert over.json()["error"]["code"] == "overloaded" and over.headers["retry-after"] == "1"

        # streaming client goes away after the first token: generation (64 x 30 ms) must stop within 1 s
        body = {"model": "tiny", "messages": MSG, "max_tokens": 64, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", headers=h, json=body) as r:
            lines = r.iter_lines()
            while '"content":"' not in next(lines) or engine.n_running == 0:
                pass  # until text is flowing
            assert engine.n_running == 1
        t0 = time.monotonic()
        while engine.n_running and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert engine.n_running == 0 and time.monotonic() - t0 < 1.0

        # non-streaming client times out: same
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", headers=h, json={**body, "stream": False}, timeout=0.3)
        t0 = time.monotonic()
        while engine.n_running and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert engine.n_running == 0 and time.monotonic() - t0 < 1.0
        metrics = httpx.get(srv.url + "/metrics", headers=h).text
        assert "yunque_cancelled_sequences_total 2.0" in metrics
        assert 'yunque_rejections_total{reason="overloaded"}' in metrics
    outcomes = [json.loads(x)["outcome"] for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert outcomes.count("cancelled") == 2 and outcomes.count("rejected") == codes.count(429)


SERVER_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from yunque.config import from_dict
    from yunque.formats.hf import load_model
    from yunque.serve import ServeConfig
    from yunque.serve.app import create_app
    from yunque.serve.server import run_server
    from yunque.serve.auth import build_authenticator
    from yunque.tokenizer import Tokenizer

    model_dir, keys, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cfg = from_dict(ServeConfig, {"auth": {"keys_file": keys}, "limits": {"max_len": 256, "max_prompt_tokens": 128}})
    model = load_model(model_dir)
    fwd = model.forward
    def slow(*a, **k):  # about 2 s per 40-token request, so SIGTERM arrives mid-generation
        time.sleep(0.05)
        return fwd(*a, **k)
    model.forward = slow
    auth = build_authenticator(True, cfg.auth.keys_file, cfg.auth.jwt)
    run_server(create_app(model, Tokenizer.from_dir(model_dir), cfg, "tiny", auth), "127.0.0.1", port, cfg, "warning")
""")


@pytest.mark.slow
def test_sigterm_drains_in_flight(model_dir, tmp_path):
    key = create_key(tmp_path / "keys.json", "drain")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(model_dir), str(tmp_path / "keys.json"), str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.1)

        async def run():
            async with httpx.AsyncClient(timeout=60) as c:
                tasks = [asyncio.create_task(stream_chat(c, url, key, 40)) for _ in range(3)]
                await asyncio.sleep(0.6)  # all three are generating now
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        assert all(r["status"] == 200 and r["done"] for r in results), results
        assert proc.wait(30) == 0  # drained: a clean exit, not uvicorn's re-raised signal
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
