"""API keys and JWT bearer tokens.

Keys look like `yq-<43 url-safe chars>` (256 random bits). The keys file holds only their
SHA-256 hashes plus a short display prefix, name, limits and revocation time, and is
written atomically with mode 0600. A fast hash is enough here: the keys are random, not
passwords, so there is nothing to brute-force. Lookups hash the presented key and compare
it with every stored hash using `hmac.compare_digest`, never stopping early, so timing
says nothing about how close a guess was. The server re-reads the file when it changes,
so `yunque keys revoke` takes effect on the next request without a restart.

JWTs are verified with PyJWT against algorithms pinned in the config (never the token's
header), with `exp`, `aud` and `iss` required and checked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from yunque.errors import ConfigError, YunqueError
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
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_keys(path: Path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read keys file: {e}") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, dict) and isinstance(k.get("sha256"), str)
                                             and isinstance(k.get("name"), str) for k in keys):
        raise ConfigError(f"{path}: not a yunque keys file (expected {{\"keys\": [{{\"name\", \"sha256\", ...}}]}})")
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
    keys.append({"name": name, "prefix": key[:7], "sha256": _hash(key), "rpm": rpm, "tpm": tpm,
                 "created": _now(), "revoked": None})
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
            try:
                self._key = Path(cfg.public_key_file).expanduser().read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"auth.jwt.public_key_file: cannot read {cfg.public_key_file}: {e}") from None

    def verify(self, token: str) -> Principal | None:
        try:
            claims = self._jwt.decode(
                token, self._key, algorithms=list(self.cfg.algorithms), audience=self.cfg.audience,
                issuer=self.cfg.issuer, leeway=self.cfg.leeway_s, options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except self._jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            return None
        return Principal(f"jwt:{sub}"[:128], "jwt", self.cfg.rpm, self.cfg.tpm)


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
    return Authenticator(KeyStore(keys_file) if required else None,
                         JWTVerifier(jwt) if (required and jwt.enabled) else None, required)
