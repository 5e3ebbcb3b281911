"""Serving throughput: continuous batching vs one-at-a-time generation, and the cost of
constrained decoding (`response_format` json_schema).

Builds a random model of a preset's shape with a small BPE tokenizer, starts `yunque serve`
(the real command, in a subprocess, on loopback, with auth, guards and metrics on), and drives
it with 1, 8 and 32 concurrent streaming clients. The baseline is sequential `generate()` in
this process with the same prompts and max_tokens. Prints aggregate generated tokens/s,
p50/p95 request latency and the ratio to the sequential baseline (target: >= 4x at 32).

The json rows send the same prompts as chat requests, with and without a `json_schema`
response_format (xgrammar), at each concurrency in turn, and print throughput, p50/p99 latency
and the grammar's overhead per generated token as a share of the unconstrained time per token
(target: < 10%). The random model's replies under the schema run to max_tokens as the free
ones do (its strings rarely close), so both rows decode about the same number of tokens.

    PYTHONPATH=. python bench/serve.py [--preset small] [--max-tokens 64] [--requests 64] [--rows all|completions|json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

WORDS = [
    "model",
    "data",
    "token",
    "batch",
    "cache",
    "serve",
    "stream",
    "guard",
    "limit",
    "key",
    "secure",
    "fast",
    "train",
    "eval",
    "export",
    "chat",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "on",
    "for",
    "with",
    "as",
    "by",
    "it",
    "that",
    "this",
    "from",
]
# A finding, as a security pipeline would ask for one: free strings, an enum and a number.
SCHEMA = {
    "type": "object",
    "properties": {
        "host": {"type": "string"},
        "severity": {"enum": ["low", "medium", "high", "critical"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "summary": {"type": "string"},
    },
    "required": ["host", "severity", "score", "summary"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "finding", "schema": SCHEMA, "strict": True}}


def corpus(n: int = 4000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx) + "."


def build(root: Path, preset: str) -> tuple[Path, object, object]:
    from yunque.formats.hf import save_model
    from yunque.model import Transformer
    from yunque.presets import get_preset
    from yunque.tokenizer import train_bpe

    (root / "c.txt").write_text(corpus(), encoding="utf-8")
    tok = train_bpe([root / "c.txt"], vocab_size=2048)
    cfg = get_preset(preset, vocab_size=tok.vocab_size)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_id, tok.eos_id
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, root / "model")
    tok.save(root / "model")
    return root / "model", model.eval(), tok


def prompts(n: int, seed: int = 1) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(8, 40, (1,), generator=g))
        out.append(" ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=g).tolist()))
    return out


def sequential(model, tok, texts: list[str], max_tokens: int) -> tuple[float, list[float]]:
    from yunque.generate import Sampling, generate

    s = Sampling(max_new_tokens=max_tokens, temperature=0.8, seed=0)
    lat, total = [], 0
    t0 = time.perf_counter()
    for t in texts:
        ids = tok.encode(t, add_special_tokens=True)
        a = time.perf_counter()
        total += len(generate(model, [ids], s, pad_id=tok.pad_id)[0])
        lat.append(time.perf_counter() - a)
    return total / (time.perf_counter() - t0), lat


async def drive(
    url: str, key: str, texts: list[str], clients: int, max_tokens: int, chat: bool = False, extra: dict | None = None
) -> tuple[float, list[float], int]:
    """Streamed /v1/completions (or /v1/chat/completions with `extra` fields) of `texts` by
    `clients` concurrent clients: (generated tokens/s, request latencies, errors)."""
    queue = list(texts)
    lat: list[float] = []
    tokens, errors = 0, 0
    route = "/v1/chat/completions" if chat else "/v1/completions"

    async def client(c: httpx.AsyncClient):
        nonlocal tokens, errors
        while queue:
            text = queue.pop()
            body = {
                "model": "bench",
                **({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}),
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "stream": True,
                "stream_options": {"include_usage": True},
                **(extra or {}),
            }
            a = time.perf_counter()
            async with c.stream("POST", url + route, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                if r.status_code != 200:
                    errors += 1
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage":{' in line:
                        tokens += json.loads(line[6:])["usage"]["completion_tokens"]
            lat.append(time.perf_counter() - a)

    limits = httpx.Limits(
        max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0
    )  # < uvicorn's 5 s
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(clients)])
        wall = time.perf_counter() - t0
    return tokens / wall, lat, errors


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def json_rows(url: str, key: str, texts: list[str], args) -> list[tuple]:
    """(mode, clients, requests, tok/s, latencies, errors) for chat without and with the schema, per concurrency."""
    asyncio.run(drive(url, key, texts[:2], 2, 8, chat=True, extra={"response_format": JSON_SCHEMA}))  # compiles it
    rows = []
    for clients in (1, 8, 32):
        n = args.sequential_requests if clients == 1 else args.requests
        for mode, extra in (("chat", None), ("chat json_schema", {"response_format": JSON_SCHEMA})):
            tps, lat, errors = asyncio.run(drive(url, key, texts[:n], clients, args.max_tokens, True, extra))
            rows.append((mode, clients, n, tps, lat, errors))
    return rows


def print_json_rows(rows: list[tuple], max_tokens: int) -> None:
    print(f"\nchat, max_tokens {max_tokens}, without and with response_format json_schema")
    print(f"{'mode':22} {'clients':>7} {'reqs':>5} {'gen tok/s':>10} {'p50 s':>7} {'p99 s':>7} {'errors':>6}")
    for mode, clients, n, tps, lat, errors in rows:
        print(f"{mode:22} {clients:>7} {n:>5} {tps:>10.1f} {pct(lat, 0.5):>7.2f} {pct(lat, 0.99):>7.2f} {errors:>6}")
    # Time per generated token is 1/throughput: the grammar's share is the constrained rows' extra time per token.
    free = {c: tps for mode, c, _, tps, _, _ in rows if mode == "chat"}
    overhead = [
        f"{c} client{'s' * (c > 1)} {(free[c] / tps - 1) * 100:+.1f}%"
        for mode, c, _, tps, _, _ in rows
        if mode != "chat" and tps > 0 and free.get(c)
    ]
    print(f"grammar overhead per token, % of unconstrained decode time (target < 10%): {', '.join(overhead)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--sequential-requests", type=int, default=8)
    ap.add_argument(
        "--rows",
        choices=["all", "completions", "json"],
        default="all",
        help="completions: continuous batching vs sequential; json: chat without and with a json_schema",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, same for the baseline and the server "
        "(1 avoids OpenMP spin-wait collapse when client and server share 2 cores)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="yq-bench-"))
    model_dir, model, tok = build(root, args.preset)
    n_params = sum(p.numel() for p in model.parameters())
    from yunque.serve.auth import create_key

    key = create_key(root / "keys.json", "bench")
    (root / "serve.yaml").write_text(
        f"model_name: bench\ntorch_threads: {args.threads}\nauth: {{keys_file: {root / 'keys.json'}}}\n"
        f"limits: {{max_batch: 32, max_len: 256, max_prompt_tokens: 128, max_queue: 256, rpm: 100000, tpm: 100000000}}\n"  # noqa: E501
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = f"from yunque.recipes.serve import serve_cmd; serve_cmd(model={str(model_dir)!r}, port={port}, config={str(root / 'serve.yaml')!r})"  # noqa: E501
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client() as c:
            for _ in range(1200):  # bounded wait for the server to come up
                if proc.poll() is not None:
                    sys.exit(f"the server exited ({proc.returncode}):\n{(root / 'server.log').read_text()}")
                try:
                    if c.get(url + "/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        texts = prompts(max(args.requests, args.sequential_requests))
        asyncio.run(drive(url, key, texts[:4], 4, 8))  # warm-up
        rows, jrows = [], []
        if args.rows in ("all", "completions"):
            # The baseline runs before and after the server runs and the ratio uses the mean, so a
            # change in machine load during the run does not flatter or penalise either side.
            seq1 = sequential(model, tok, texts[: args.sequential_requests], args.max_tokens)
            for clients in (1, 8, 32):
                n = args.sequential_requests if clients == 1 else args.requests
                tps, lat, errors = asyncio.run(drive(url, key, texts[:n], clients, args.max_tokens))
                rows.append(("server", clients, n, tps, lat, errors))
            seq2 = sequential(model, tok, texts[: args.sequential_requests], args.max_tokens)
            seq_tps = (seq1[0] + seq2[0]) / 2
            rows.insert(0, ("sequential generate()", 1, 2 * args.sequential_requests, seq_tps, seq1[1] + seq2[1], 0))
        if args.rows in ("all", "json"):
            jrows = json_rows(url, key, texts, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(
        f"\npreset {args.preset} ({n_params / 1e6:.1f}M params), max_tokens {args.max_tokens}, torch threads {torch.get_num_threads()}, "  # noqa: E501
        f"{os.cpu_count()} CPUs"
    )
    if rows:
        print(
            f"{'mode':22} {'clients':>7} {'reqs':>5} {'gen tok/s':>10} {'p50 s':>7} {'p95 s':>7} {'x seq':>6} {'errors':>6}"  # noqa: E501
        )
    for mode, clients, n, tps, lat, errors in rows:
        print(
            f"{mode:22} {clients:>7} {n:>5} {tps:>10.1f} {pct(lat, 0.5):>7.2f} {pct(lat, 0.95):>7.2f} {tps / seq_tps:>6.2f} {errors:>6}"  # noqa: E501
        )
    if jrows:
        print_json_rows(jrows, args.max_tokens)


if __name__ == "__main__":
    main()
