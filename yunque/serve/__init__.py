"""OpenAI-compatible serving, safe by default: loopback unless authenticated, API keys/JWT,
rate limits, size caps, guards, audit log, Prometheus metrics, continuous batching.

    from yunque.serve import ServeConfig, build_app
    app = build_app(model, tokenizer, ServeConfig(), "my-model")   # an ASGI app for uvicorn
"""

from __future__ import annotations

from yunque.serve.config import ServeConfig


def build_app(model, tokenizer, cfg: ServeConfig, model_name: str, **ui):
    """The ASGI app (gate + FastAPI routes + Service); `.app` is the FastAPI app, `.app.state.service` the Service
    and `.app.state.engine` its engine. `ui`: the web page's options of `create_app` (ui, model_dir, adapter,
    runs_dir)."""
    from yunque.serve.app import create_app
    from yunque.serve.auth import build_authenticator

    auth = build_authenticator(cfg.auth.required, cfg.auth.keys_file, cfg.auth.jwt)
    return create_app(model, tokenizer, cfg, model_name, auth, **ui)


__all__ = ["ServeConfig", "build_app"]
