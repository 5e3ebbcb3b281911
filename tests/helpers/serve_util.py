"""Shared pieces of the serving tests: a tiny random model + tokenizer on disk and a real
uvicorn server on an ephemeral loopback port, run in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Serving models safely needs auth, limits and guards. "
    "Continuous batching keeps the accelerator busy while clients stream tokens. "
) * 20


def build_model_dir(root: Path, layers: int = 2, hidden: int = 64, seed: int = 0, context: int = 1024) -> Path:
    """A tokenizer (byte-level BPE with the Llama 3 chat template) and a random Llama model in `root`."""
    from yunque.formats.hf import save_model
    from yunque.model import ModelConfig, Transformer
    from yunque.tokenizer import train_bpe

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    tok = train_bpe([root / "corpus.txt"], vocab_size=384)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # wider than init_weights' N(0, 0.02) so greedy text varies instead of repeating one token
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.25, generator=g)
    out = root / "model"
    save_model(model, out)
    tok.save(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app, cfg):
        import uvicorn

        from yunque.serve.server import uvicorn_config

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, cfg, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def make_server(
    model_dir: Path,
    tmp: Path,
    limits: dict | None = None,
    guards: dict | None = None,
    auth: dict | None = None,
    slow_s: float = 0.0,
    audit: bool = True,
    embeddings: dict | None = None,
):
    """(ServerThread, api_key, app) for the model in `model_dir`; `slow_s` delays every forward
    (to make generation last long enough to observe cancellation and draining)."""
    from yunque.config import from_dict
    from yunque.formats.hf import load_model
    from yunque.serve import ServeConfig, build_app
    from yunque.serve.auth import create_key
    from yunque.tokenizer import Tokenizer

    keys = tmp / "keys.json"
    key = create_key(keys, "tester")
    cfg = from_dict(
        ServeConfig,
        {
            "limits": {
                "max_batch": 8,
                "max_len": 256,
                "max_prompt_tokens": 192,
                "max_tokens": 64,
                "default_max_tokens": 16,
                **(limits or {}),
            },
            "auth": {"keys_file": str(keys), **(auth or {})},
            "guards": guards or {},
            "audit": {"path": str(tmp / "audit.jsonl")} if audit else {},
            "embeddings": embeddings or {},
        },
    )
    model = load_model(model_dir)
    if slow_s:
        fwd = model.forward

        def slow_forward(*a, **k):
            time.sleep(slow_s)
            return fwd(*a, **k)

        model.forward = slow_forward
    app = build_app(model, Tokenizer.from_dir(model_dir), cfg, "tiny")
    return ServerThread(app, cfg), key, app
