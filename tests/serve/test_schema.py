"""Schemathesis against the server's own OpenAPI schema: valid and invalid generated requests
must never produce a 5xx, and every error must have OpenAI's shape."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from serve_util import build_model_dir, make_server  # noqa: E402

EXAMPLES = 30  # per operation and mode: enough to hit every validator, a few seconds in all


def check_response(resp) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    assert resp.headers.get("x-request-id")
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err


def fuzzer(op, mode, url: str, headers: dict, seen: dict):
    from schemathesis import GenerationMode

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def fuzz(case):
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"  # reach generation, not only the unknown-model 404
        resp = case.call(base_url=url, headers=headers)
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        check_response(resp)

    return fuzz


def test_fuzz_openapi_schema(tmp_path):
    from schemathesis import GenerationMode

    srv, key, app = make_server(
        build_model_dir(tmp_path / "m"),
        tmp_path,
        limits={"rpm": 100_000, "tpm": 100_000_000, "max_tokens": 8, "default_max_tokens": 4},
    )
    schema = schemathesis.openapi.from_dict(app.app.openapi())
    headers = {"Authorization": f"Bearer {key}"}
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
    seen: dict[int, int] = {}
    with srv:
        for op in ops:
            modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
            for mode in modes:  # a GET without parameters has no invalid form
                fuzzer(op, mode, srv.url, headers, seen)()
    assert seen.get(200, 0) > 10 and seen.get(400, 0) > 10, seen  # both paths were exercised
