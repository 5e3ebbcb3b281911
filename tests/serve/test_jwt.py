"""JWTs signed with RS256 and ES256 keys made here: accepted when valid, refused (401, never 500)
when their times are not plain numbers within bounds or their JSON is hostile; key files are
checked at start-up (garbage, a private key, a key of the wrong type -> one-line error, exit 2);
and the serve extra installs what public-key verification needs."""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from serve_util import build_model_dir, make_server

from yunque.errors import ConfigError, MissingExtraError
from yunque.serve.auth import build_authenticator
from yunque.serve.config import JWTConfig

ROOT = Path(__file__).resolve().parents[2]
AUD, ISS = "yunque", "https://idp.test"


def new_key(alg: str):
    return rsa.generate_private_key(65537, 2048) if alg.startswith("RS") else ec.generate_private_key(ec.SECP256R1())


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key) -> bytes:
    enc = serialization
    return key.private_bytes(enc.Encoding.PEM, enc.PrivateFormat.PKCS8, enc.NoEncryption())


def sign(key, alg: str, **over) -> str:
    claims = {"sub": "alice", "aud": AUD, "iss": ISS, "iat": int(time.time()), "exp": int(time.time()) + 300, **over}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=alg)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("jwt"))


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_public_key_tokens(model_dir, tmp_path, alg):
    key, other = new_key(alg), new_key(alg)
    (tmp_path / "idp.pem").write_bytes(public_pem(key))
    jwt_cfg = {
        "enabled": True,
        "audience": AUD,
        "issuer": ISS,
        "algorithms": [alg],
        "public_key_file": str(tmp_path / "idp.pem"),
        "max_lifetime_s": 3600,
    }
    srv, _, _ = make_server(model_dir, tmp_path, auth={"jwt": jwt_cfg}, limits={"rpm": 10_000})
    now = time.time()
    hostile = jwt.api_jws.encode(b'{"sub":"alice","x":' + b"[" * 5000 + b"]" * 5000 + b"}", key, algorithm=alg)
    refused = {
        "another key": sign(other, alg),
        "exp as a string": sign(key, alg, exp=str(int(now) + 300)),
        "exp as a boolean": sign(key, alg, exp=True),
        "exp as a float far ahead": sign(key, alg, exp=1e300),
        "exp past the lifetime": sign(key, alg, exp=int(now) + 10 * 86400),
        "iat in the future": sign(key, alg, iat=int(now) + 3600),
        "iat long before exp": sign(key, alg, iat=int(now) - 7200),
        "nbf as a string": sign(key, alg, nbf="0"),
        "expired": sign(key, alg, exp=int(now) - 10),
        "JSON nested 5000 deep": hostile,
    }
    with srv, httpx.Client() as c:
        ok = c.get(srv.url + "/v1/models", headers={"Authorization": "Bearer " + sign(key, alg)})
        assert ok.status_code == 200, ok.text
        ok = c.get(srv.url + "/v1/models", headers={"Authorization": "Bearer " + sign(key, alg, exp=now + 60.5)})
        assert ok.status_code == 200, "a fractional exp is a number too"
        for label, token in refused.items():
            r = c.get(srv.url + "/v1/models", headers={"Authorization": "Bearer " + token})
            assert r.status_code == 401, (label, r.status_code, r.text)


def check(tmp_path: Path, data: bytes, algorithms: list[str]):
    (tmp_path / "k.pem").write_bytes(data)
    cfg = JWTConfig(enabled=True, audience=AUD, issuer=ISS, algorithms=algorithms, public_key_file=tmp_path / "k.pem")
    cfg.validate()
    return build_authenticator(True, tmp_path / "keys.json", cfg)


def test_key_files_are_checked_at_start_up(tmp_path):
    rsa_key, ec_key = new_key("RS256"), new_key("ES256")
    assert check(tmp_path, public_pem(rsa_key), ["RS256", "PS256"]).configured
    assert check(tmp_path, public_pem(ec_key), ["ES256"]).configured
    cases = {
        "garbage": (
            b"-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n",
            ["RS256"],
            "not a PEM public key",
        ),
        "empty": (b"", ["RS256"], "not a PEM public key"),
        "a private key": (private_pem(rsa_key), ["RS256"], "holds a private key"),
        "an EC key for RS256": (public_pem(ec_key), ["RS256"], "holds a secp256r1 key, but .* has RS256"),
        "an RSA key for ES256": (public_pem(rsa_key), ["ES256"], "holds a RSA key, but auth.jwt.algorithms has ES256"),
        "a P-256 key for ES384": (public_pem(ec_key), ["ES384"], "needs secp384r1"),
        "a weak RSA key": (public_pem(rsa.generate_private_key(65537, 1024)), ["RS256"], "too weak"),
    }
    for label, (data, algs, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            check(tmp_path, data, algs)
            pytest.fail(f"{label}: accepted")
    (tmp_path / "k.pem").unlink()
    with pytest.raises(ConfigError, match="k.pem: cannot read"):
        check_existing = JWTConfig(enabled=True, audience=AUD, issuer=ISS, public_key_file=tmp_path / "k.pem")
        build_authenticator(True, tmp_path / "keys.json", check_existing)


def test_serve_refuses_a_bad_key_file_in_one_line(tmp_path, capsys):
    from yunque.__main__ import main

    (tmp_path / "idp.pem").write_bytes(private_pem(new_key("RS256")))
    (tmp_path / "serve.yaml").write_text(
        f"auth:\n  keys_file: {tmp_path / 'keys.json'}\n  jwt: {{enabled: true, audience: {AUD}, issuer: '{ISS}', "
        f"algorithms: [RS256], public_key_file: {tmp_path / 'idp.pem'}}}\n"
    )
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--config", str(tmp_path / "serve.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "private key" in err[0] and "idp.pem" in err[0], err


def test_missing_cryptography_is_a_clear_error(tmp_path, monkeypatch):
    """Without `cryptography` every RS256/ES256 token was refused while the server said "auth: on"."""
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(MissingExtraError, match=r"pyjwt\[crypto\].*yunque\[serve\]"):
        check(tmp_path, b"-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n", ["RS256"])


def test_serve_extra_installs_public_key_verification():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert any(req.replace(" ", "").startswith("pyjwt[crypto]") for req in extra), extra
