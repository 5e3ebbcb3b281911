"""Auth matrix over every route, key management, JWT checks and the bind policy."""

from __future__ import annotations

import json
import os
import stat
import time
import warnings

import httpx
import jwt
import pytest
from serve_util import build_model_dir, make_server

from yunque.config import from_dict
from yunque.errors import ConfigError, YunqueError
from yunque.serve.auth import build_authenticator, create_key, read_keys, revoke_key
from yunque.serve.config import ServeConfig
from yunque.serve.server import check_bind

SECRET = "s" * 40
JWT_CFG = {
    "enabled": True,
    "audience": "yunque",
    "issuer": "https://idp.test",
    "algorithms": ["HS256"],
    "secret_env": "YQ_TEST_JWT",
}


def token(**over) -> str:
    claims = {"sub": "alice", "aud": "yunque", "iss": "https://idp.test", "exp": int(time.time()) + 60, **over}
    alg = claims.pop("_alg", "HS256")
    key = claims.pop("_key", SECRET)
    with warnings.catch_warnings():  # HS512 with a 40-byte key: only used to prove it is rejected
        warnings.simplefilter("ignore")
        return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=alg)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ["YQ_TEST_JWT"] = SECRET
    tmp = tmp_path_factory.mktemp("serve_auth")
    srv, key, app = make_server(build_model_dir(tmp / "m"), tmp, auth={"jwt": JWT_CFG}, limits={"rpm": 10_000})
    revoked = create_key(tmp / "keys.json", "gone")
    revoke_key(tmp / "keys.json", "gone")
    with srv:
        yield srv, key, revoked, app, tmp / "keys.json"


def routes(app) -> list[tuple[str, str]]:
    schema = app.app.openapi()
    out = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    return out + [("GET", "/openapi.json"), ("GET", "/v1/does-not-exist"), ("POST", "/admin")]


def test_auth_matrix(server):
    srv, key, revoked, app, _ = server
    bad = {
        "no credentials": {},
        "wrong key": {"Authorization": "Bearer yq-" + "A" * 43},
        "revoked key": {"Authorization": f"Bearer {revoked}"},
        "key without Bearer": {"Authorization": key},
        "basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
        "expired JWT": {"Authorization": "Bearer " + token(exp=int(time.time()) - 5)},
        "wrong aud": {"Authorization": "Bearer " + token(aud="someone-else")},
        "wrong iss": {"Authorization": "Bearer " + token(iss="https://evil.test")},
        "no exp": {"Authorization": "Bearer " + token(exp=None)},
        "wrong secret": {"Authorization": "Bearer " + token(_key="x" * 40)},
        "unpinned alg": {"Authorization": "Bearer " + token(_alg="HS512")},
        "alg none": {
            "Authorization": "Bearer "
            + jwt.encode(
                {"sub": "a", "aud": "yunque", "iss": "https://idp.test", "exp": int(time.time()) + 60},
                None,
                algorithm="none",
            )
        },
    }
    good = {"API key": {"Authorization": f"Bearer {key}"}, "JWT": {"Authorization": "Bearer " + token()}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 2}
    checked = 0
    client = httpx.Client()  # one client: a fresh one per call spends ~0.1 s building an SSL context
    for method, path in routes(app):
        for label, headers in {**bad, **good}.items():
            kw = (
                {
                    "json": {
                        k: v
                        for k, v in body.items()
                        if (k != "prompt") == ("chat" in path) or k in ("model", "max_tokens")
                    }
                }
                if method == "POST"
                else {}
            )
            r = client.request(method, srv.url + path, headers=headers, **kw)
            if path in ("/health", "/ready"):
                assert r.status_code == 200, (label, path)
            elif label in bad:
                assert r.status_code == 401, (label, method, path, r.status_code)
                assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
            else:
                assert r.status_code != 401, (label, method, path, r.text)
                if path in ("/v1/models", "/metrics", "/v1/chat/completions", "/v1/completions", "/openapi.json"):
                    assert r.status_code == 200, (label, path, r.text)
            checked += 1
    assert checked >= 7 * len({**bad, **good})
    metrics = client.get(srv.url + "/metrics", headers=good["API key"]).text
    client.close()
    assert 'yunque_rejections_total{reason="auth"}' in metrics


def test_revoke_takes_effect_on_running_server(server):
    srv, _, _, _, path = server
    k = create_key(path, "temp")
    h = {"Authorization": f"Bearer {k}"}
    assert httpx.get(srv.url + "/v1/models", headers=h).status_code == 200
    revoke_key(path, "temp")
    assert httpx.get(srv.url + "/v1/models", headers=h).status_code == 401


def test_keys_cli(tmp_path, capsys):
    from yunque.recipes.serve import keys_create_cmd, keys_list_cmd, keys_revoke_cmd

    path = tmp_path / "k" / "keys.json"
    assert keys_create_cmd(name="ci-bot", rpm=5, tpm=1000, keys_file=str(path)) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("yq-") and len(key) > 40
    raw = path.read_text()
    assert key not in raw and key[8:] not in raw  # only the hash (and a 7-char prefix) is stored
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rec = read_keys(path)[0]
    assert rec["name"] == "ci-bot" and rec["rpm"] == 5 and len(rec["sha256"]) == 64
    with pytest.raises(YunqueError, match="exists"):
        keys_create_cmd(name="ci-bot", keys_file=str(path))
    keys_list_cmd(keys_file=str(path))
    listing = capsys.readouterr().out
    assert "ci-bot" in listing and key not in listing
    keys_revoke_cmd("ci-bot", keys_file=str(path))
    assert read_keys(path)[0]["revoked"]
    with pytest.raises(YunqueError, match="no active key"):
        keys_revoke_cmd("ci-bot", keys_file=str(path))
    with pytest.raises(YunqueError, match="key name"):
        create_key(path, "bad name!")
    path.write_text(json.dumps({"nope": 1}))
    with pytest.raises(ConfigError, match="not a yunque keys file"):
        read_keys(path)


def test_bind_policy(tmp_path, monkeypatch):
    keys = tmp_path / "keys.json"

    def cfg(**auth):
        c = from_dict(ServeConfig, {"auth": {"keys_file": str(keys), **auth}})
        return c, build_authenticator(c.auth.required, c.auth.keys_file, c.auth.jwt)

    c, a = cfg()
    with pytest.raises(YunqueError, match="no authentication configured"):
        check_bind("127.0.0.1", c, a)  # safe by default: no key, no server
    c, a = cfg(required=False)
    check_bind("127.0.0.1", c, a)
    check_bind("::1", c, a)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(YunqueError, match="refusing to listen"):
            check_bind(host, c, a)
    create_key(keys, "ops")
    c, a = cfg()
    check_bind("0.0.0.0", c, a)  # authenticated: any address is allowed
    with pytest.raises(ConfigError, match="do not mix"):
        from_dict(ServeConfig, {"auth": {"jwt": {**JWT_CFG, "algorithms": ["HS256", "RS256"]}}})
    with pytest.raises(ConfigError, match="audience and issuer"):
        from_dict(ServeConfig, {"auth": {"jwt": {**JWT_CFG, "audience": ""}}})
    monkeypatch.setenv("YQ_TEST_JWT", "short")
    with pytest.raises(ConfigError, match=">= 32"):
        cfg(jwt=JWT_CFG)


def test_serve_cmd_refuses_before_loading(tmp_path):
    from yunque.recipes.serve import serve_cmd

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"auth:\n  required: false\n  keys_file: {tmp_path / 'k.json'}\n")
    with pytest.raises(YunqueError, match="refusing to listen on 0.0.0.0"):
        serve_cmd(model=str(tmp_path / "no-model"), host="0.0.0.0", config=str(cfg))
    cfg.write_text("limits:\n  max_batchh: 3\n")
    with pytest.raises(ConfigError, match=r"serve.yaml:2: limits.max_batchh: unknown key"):
        serve_cmd(model=str(tmp_path / "no-model"), config=str(cfg))
