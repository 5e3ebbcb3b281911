"""API keys and JWT bearer tokens.

Keys look like `yq-<43 url-safe chars>` (256 random bits). The keys file holds only their
SHA-256 hashes plus a short display prefix, name, limits and revocation time, and is
written atomically with mode 0600. A fast hash is enough here: the keys are random, not
passwords, so there is nothing to brute-force. Lookups hash the presented key and compare
it with every stored hash using `hmac.compare_digest`, never stopping early, so timing
says nothing about how close a guess was. The server re-reads the file when it changes,
so `yunque keys revoke` takes effect on the next request without a restart.

JWTs are verified with PyJWT against algorithms pinned in the config (never the token's
header), with `exp`, `aud` and `iss` required and checked, and `exp`/`nbf`/`iat` required to be
plain numbers within `max_lifetime_s` of now (PyJWT alone takes "9999999999" or 1e300). The
public key file is checked at start-up: a PEM public key (or certificate) of the type the
algorithms need, never a private key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import math
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from yunque.errors import ConfigError, YunqueError, missing_extra
from yunque.serve.config import JWTConfig

KEY_PREFIX = "yq-"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name (or the JWT's subject) and their own limits, if any."""

    name: str
    kind: str  # "key" | "jwt" | "anonymous"
    rpm: int | None = None
    tpm: int | None = None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_keys(path: Path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read keys file: {e}") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not all(
        isinstance(k, dict) and isinstance(k.get("sha256"), str) and isinstance(k.get("name"), str) for k in keys
    ):
        raise ConfigError(f'{path}: not a yunque keys file (expected {{"keys": [{{"name", "sha256", ...}}]}})')
    return keys


def _write_keys(path: Path, keys: list[dict]) -> None:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "keys": keys}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_key(path: Path, name: str, rpm: int | None = None, tpm: int | None = None) -> str:
    """Add a key named `name` and return it; only its hash is stored, so it is shown once."""
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise YunqueError(f"key name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
    for label, v in (("rpm", rpm), ("tpm", tpm)):
        if v is not None and v <= 0:
            raise YunqueError(f"--{label}: must be > 0, got {v}")
    keys = read_keys(path)
    if any(k["name"] == name and not k.get("revoked") for k in keys):
        raise YunqueError(f"{path}: an active key named {name!r} exists; revoke it first or pick another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    keys.append(
        {
            "name": name,
            "prefix": key[:7],
            "sha256": _hash(key),
            "rpm": rpm,
            "tpm": tpm,
            "created": _now(),
            "revoked": None,
        }
    )
    _write_keys(path, keys)
    return key


def revoke_key(path: Path, name: str) -> int:
    """Revoke every active key named `name`; returns how many."""
    keys = read_keys(path)
    hits = [k for k in keys if k["name"] == name and not k.get("revoked")]
    if not hits:
        raise YunqueError(f"{Path(path).expanduser()}: no active key named {name!r}")
    for k in hits:
        k["revoked"] = _now()
    _write_keys(path, keys)
    return len(hits)


class KeyStore:
    """The server's view of the keys file, reloaded when its mtime or size changes."""

    def __init__(self, path: Path):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: list[dict] = []
        self._reload()

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp != self._stamp:
            keys = read_keys(self.path)
            with self._lock:
                self._keys, self._stamp = keys, stamp

    @property
    def active(self) -> int:
        return sum(1 for k in self._keys if not k.get("revoked"))

    def lookup(self, key: str) -> Principal | None:
        try:
            self._reload()
        except ConfigError:
            pass  # a broken edit keeps the last good set rather than locking everyone out or in
        digest = _hash(key)
        found = None
        for k in self._keys:  # no early exit: every request does the same work
            if hmac.compare_digest(digest, k["sha256"]) and not k.get("revoked"):
                found = k
        if found is None:
            return None
        return Principal(found["name"], "key", found.get("rpm"), found.get("tpm"))


class JWTVerifier:
    def __init__(self, cfg: JWTConfig):
        import jwt  # PyJWT

        self._jwt, self.cfg = jwt, cfg
        if cfg.secret_env:
            secret = os.environ.get(cfg.secret_env)
            if not secret or len(secret) < 32:
                raise ConfigError(f"auth.jwt.secret_env: ${cfg.secret_env} must hold a secret of >= 32 characters")
            self._key = secret
        else:
            self._key = load_public_key(Path(cfg.public_key_file).expanduser(), cfg.algorithms)

    def verify(self, token: str) -> Principal | None:
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=list(self.cfg.algorithms),
                audience=self.cfg.audience,
                issuer=self.cfg.issuer,
                leeway=self.cfg.leeway_s,
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except Exception:  # any token that cannot be verified (PyJWT errors, JSON nested too deep) is a 401
            return None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or not self._times_ok(claims):
            return None
        return Principal(f"jwt:{sub}"[:128], "jwt", self.cfg.rpm, self.cfg.tpm)

    def _times_ok(self, claims: dict) -> bool:
        """exp/nbf/iat are JSON numbers (not strings or booleans), finite, and within the token
        lifetime this server accepts; PyJWT has checked expiry and not-before already."""
        now, slack, life = time.time(), self.cfg.leeway_s, self.cfg.max_lifetime_s
        times = {c: claims[c] for c in ("exp", "nbf", "iat") if c in claims}
        if not all(type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in times.values()):
            return False
        exp = times["exp"]
        if exp > now + life + slack:  # a token that never (practically) expires is a stolen token's best friend
            return False
        if times.get("iat", 0) > now + slack:
            return False
        return all(exp - times[c] <= life + slack for c in ("nbf", "iat") if c in times)


# Which public key type each algorithm verifies with, and (for EC) the curve.
_KEY_TYPES = {
    "RS": "RSA",
    "PS": "RSA",
    "ES256": "secp256r1",
    "ES384": "secp384r1",
    "ES512": "secp521r1",
    "EdDSA": "EdDSA",
}


def load_public_key(path: Path, algorithms: list[str]):
    """The PEM public key (or certificate's key) in `path`, checked against `algorithms`: a clear
    ConfigError for an unreadable file, a private key, garbage, or a key of the wrong type."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    except ModuleNotFoundError:
        needed_by = f"auth.jwt with {', '.join(algorithms)}"
        raise missing_extra("pyjwt[crypto]", "serve", needed_by, "cryptography") from None
    where = f"auth.jwt.public_key_file: {path}"
    try:
        data = path.read_bytes()[:1_000_000]
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror or e}") from None
    if b"PRIVATE KEY" in data:
        raise ConfigError(
            f"{where}: holds a private key; give the identity provider's public key "
            "(-----BEGIN PUBLIC KEY-----): a signing key must never sit on the server"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except Exception as e:  # cryptography raises ValueError, TypeError or UnsupportedAlgorithm
        raise ConfigError(f"{where}: not a PEM public key or certificate ({type(e).__name__}: {e})") from None
    if isinstance(key, rsa.RSAPublicKey):
        have = "RSA"
        if key.key_size < 2048:
            raise ConfigError(f"{where}: an RSA key of {key.key_size} bits is too weak; use >= 2048")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        have = key.curve.name
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        have = "EdDSA"
    else:
        raise ConfigError(f"{where}: a {type(key).__name__}, which no JWT algorithm here verifies")
    for alg in algorithms:
        want = _KEY_TYPES.get(alg[:2] if alg[:2] in ("RS", "PS") else alg)
        if want != have:
            raise ConfigError(f"{where}: holds a {have} key, but auth.jwt.algorithms has {alg} (needs {want})")
    return key


class Authenticator:
    """Bearer token -> Principal, or None for any failure (the caller answers one uniform 401)."""

    def __init__(self, keys: KeyStore | None, jwt: JWTVerifier | None, required: bool):
        self.keys, self.jwt, self.required = keys, jwt, required

    @property
    def configured(self) -> bool:
        return self.jwt is not None or (self.keys is not None and self.keys.active > 0)

    def authenticate(self, authorization: str | None) -> Principal | None:
        if not self.required:
            return Principal("anonymous", "anonymous")
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 8192:
            return None
        if token.count(".") == 2 and not token.startswith(KEY_PREFIX):
            return self.jwt.verify(token) if self.jwt is not None else None
        return self.keys.lookup(token) if self.keys is not None else None


def build_authenticator(required: bool, keys_file: Path, jwt: JWTConfig) -> Authenticator:
    return Authenticator(
        KeyStore(keys_file) if required else None, JWTVerifier(jwt) if (required and jwt.enabled) else None, required
    )
