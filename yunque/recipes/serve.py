"""`yunque serve` and `yunque keys create|list|revoke` (the client of `yunque chat --url` is yunque.serve.client)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from yunque.errors import YunqueError, require
from yunque.inference import load
from yunque.serve.config import DEFAULT_KEYS_FILE


def serve_cmd(
    *,
    model: str,
    adapter: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: str | None = None,
    allow_nonfinite: bool = False,
    ui: Literal["on", "off"] = "on",
    runs: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> int:
    """Serve a model with an OpenAI-compatible API (auth, limits, guards, metrics) and a web page at /ui/.

    Args:
        model: model directory (Hugging Face layout: config.json, safetensors, tokenizer files)
        adapter: LoRA adapter directory (PEFT format) applied on top of the model
        host: address to bind; anything but loopback requires authentication
        port: TCP port
        config: serve.yaml (limits, auth, guards, audit); unknown keys are errors
        allow_nonfinite: load weights that hold NaN or Inf (refused by default; requests that hit them get a 500)
        ui: the web page at /ui/ (chat, model card, runs, health; every call it makes needs the API key); off removes
            it and its /yunque/* routes
        runs: a directory of training runs (their metrics.jsonl, run.json, eval.json, redteam.json) for the page
        ssl_certfile: serve HTTPS with this PEM certificate (chain), with --ssl-keyfile; behind a TLS-terminating
            proxy, leave both out
        ssl_keyfile: the certificate's unencrypted PEM private key
    """
    for module, package in (
        ("fastapi", None),
        ("uvicorn", None),
        ("prometheus_client", "prometheus-client"),
        ("jwt", "pyjwt"),
        ("regex", None),
    ):
        require(module, "serve", "yunque serve", package=package)
    from yunque.config import load_config
    from yunque.serve.app import create_app
    from yunque.serve.auth import build_authenticator
    from yunque.serve.config import ServeConfig
    from yunque.serve.server import check_bind, check_tls, run_server

    if not 0 < port < 65536:
        raise YunqueError(f"--port {port}: expected 1-65535")
    if runs is not None and ui == "off":
        raise YunqueError("--runs: the runs are shown on the web page, which --ui off turns off")
    if runs is not None and not Path(runs).is_dir():
        raise YunqueError(f"--runs {runs}: not a directory")
    cfg = load_config(ServeConfig, config)
    auth = build_authenticator(cfg.auth.required, cfg.auth.keys_file, cfg.auth.jwt)
    check_bind(host, cfg, auth)  # before the (slow) model load
    check_tls(ssl_certfile, ssl_keyfile)
    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    from yunque.models import resolve_model

    model_dir = resolve_model(model)  # the directory, for the model card
    # An adapter is merged into the weights: serving runs plain nn.Linear at full speed.
    m, tok = load(model_dir, adapter, cfg.dtype, quantize_base=False, allow_nonfinite=allow_nonfinite)
    if cfg.torch_threads is None:
        from yunque.threads import fit_threads

        fit_threads(m)
    name = cfg.model_name or Path(model).resolve().name
    app = create_app(
        m,
        tok,
        cfg,
        name,
        auth,
        ui=ui == "on",
        model_dir=model_dir,
        adapter=Path(adapter) if adapter else None,
        runs_dir=Path(runs) if runs else None,
    )
    print(
        f"serving {name} on {'https' if ssl_certfile else 'http'}://{host}:{port}/v1 "
        f"(auth: {'on' if cfg.auth.required else 'OFF, loopback only'})"
        + (f"; web page: {'https' if ssl_certfile else 'http'}://{host}:{port}/ui/" if ui == "on" else ""),
        file=sys.stderr,
    )
    run_server(app, host, port, cfg, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    return 0


def keys_create_cmd(
    *, name: str, rpm: int | None = None, tpm: int | None = None, keys_file: str = str(DEFAULT_KEYS_FILE)
) -> int:
    """Create an API key; it is printed once and only its SHA-256 hash is stored.

    Args:
        name: who the key is for (letters, digits, - _ .); shows in logs and metrics
        rpm: requests per minute for this key (default: the server's limits.rpm)
        tpm: tokens per minute for this key (default: the server's limits.tpm)
        keys_file: the keys file the server reads (auth.keys_file)
    """
    from yunque.serve.auth import create_key

    key = create_key(Path(keys_file), name, rpm, tpm)
    print(f"created key {name!r} in {Path(keys_file).expanduser()}; it is shown only now:", file=sys.stderr)
    print(key)
    return 0


def keys_list_cmd(keys_file: str = str(DEFAULT_KEYS_FILE)) -> int:
    """List API keys (name, prefix, limits, created, revoked); never the keys themselves.

    Args:
        keys_file: the keys file the server reads (auth.keys_file)
    """
    from yunque.serve.auth import read_keys

    keys = read_keys(Path(keys_file))
    if not keys:
        print(f"no keys in {Path(keys_file).expanduser()}")
        return 0
    print(f"{'name':20} {'prefix':8} {'rpm':>6} {'tpm':>8} {'created':26} revoked")
    for k in keys:
        print(
            f"{k['name']:20} {k.get('prefix', ''):8} {k.get('rpm') or '-'!s:>6} {k.get('tpm') or '-'!s:>8} "
            f"{k.get('created', ''):26} {k.get('revoked') or '-'}"
        )
    return 0


def keys_revoke_cmd(name: str, keys_file: str = str(DEFAULT_KEYS_FILE)) -> int:
    """Revoke the active key(s) named NAME; a running server refuses them from the next request.

    Args:
        name: the key's name
        keys_file: the keys file the server reads (auth.keys_file)
    """
    from yunque.serve.auth import revoke_key

    n = revoke_key(Path(keys_file), name)
    print(f"revoked {n} key(s) named {name!r}", file=sys.stderr)
    return 0
