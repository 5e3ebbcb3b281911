"""`ServeConfig`: everything `yunque serve` can be told, loaded strictly from `--config serve.yaml`.

Defaults are the safe choice: authentication required, input guard blocking, output guard
redacting, every size and count capped. A YAML file holds only what differs, e.g.

    limits: {max_batch: 32, rpm: 120}
    auth: {keys_file: /etc/yunque/keys.json, jwt: {enabled: true, public_key_file: jwt.pem, algorithms: [RS256],
           audience: yunque, issuer: https://idp.example}}
    audit: {path: /var/log/yunque/audit.jsonl}
    embeddings: {pooling: last, normalize: false}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from yunque.errors import ConfigError

DEFAULT_KEYS_FILE = Path("~/.config/yunque/keys.json")
_HMAC_ALGS = {"HS256", "HS384", "HS512"}
_PUBKEY_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}


@dataclass
class LimitsConfig:
    max_batch: int = field(default=16, metadata={"gt": 0})  # rows of the KV pool decoded together
    max_len: int = field(default=1024, metadata={"gt": 1})  # per-row cache length: prompt + completion
    max_queue: int = field(default=64, metadata={"ge": 0})  # sequences waiting for a row; beyond: 429 overloaded
    max_prefill_tokens: int = field(default=2048, metadata={"gt": 0})  # per engine step, so decode is never starved
    max_body_bytes: int = field(default=1_000_000, metadata={"gt": 0})
    max_header_bytes: int = field(default=16_384, metadata={"ge": 1024})
    max_prompt_tokens: int = field(default=768, metadata={"gt": 0})
    max_tokens: int = field(default=512, metadata={"gt": 0})  # cap on a request's max_tokens
    default_max_tokens: int = field(default=128, metadata={"gt": 0})
    max_n: int = field(default=4, metadata={"gt": 0})  # choices per request (all prompts x n)
    max_embedding_inputs: int = field(default=128, metadata={"gt": 0})  # inputs per /v1/embeddings request
    rpm: int = field(default=60, metadata={"gt": 0})  # per key unless the key sets its own
    tpm: int = field(default=60_000, metadata={"gt": 0})  # prompt + max_tokens x n, unused part refunded
    # All message (or prompt) text of one request, checked before any guard, template or tokenizer.
    max_input_chars: int = field(default=100_000, metadata={"gt": 0})
    prep_timeout_s: float = field(default=5.0, metadata={"gt": 0})  # guards + chat template + tokenize, per request
    # Transport: a connection must send its request headers within header_timeout_s (from its
    # first byte, or from connecting) and its body within body_timeout_s after them; idle
    # keep-alive connections close after keep_alive_s; connections past max_connections are closed.
    header_timeout_s: float = field(default=10.0, metadata={"gt": 0})
    body_timeout_s: float = field(default=30.0, metadata={"gt": 0})
    keep_alive_s: float = field(default=5.0, metadata={"gt": 0})
    max_connections: int = field(default=512, metadata={"gt": 0})

    def validate(self) -> None:
        if self.max_prompt_tokens >= self.max_len:
            raise ConfigError(
                f"limits.max_prompt_tokens: must be < limits.max_len ({self.max_len}), got {self.max_prompt_tokens}"
            )
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"limits.default_max_tokens: must be <= limits.max_tokens ({self.max_tokens})")


@dataclass
class JWTConfig:
    """Bearer JWTs from an identity provider. The algorithm list is pinned here, never read from the token."""

    enabled: bool = False
    audience: str = ""
    issuer: str = ""
    algorithms: list[str] = field(default_factory=lambda: ["RS256"])
    public_key_file: Path | None = None  # PEM, for RS*/PS*/ES*/EdDSA
    secret_env: str | None = None  # name of the environment variable holding an HS* secret (never in YAML)
    leeway_s: float = field(default=0.0, metadata={"ge": 0})
    # exp at most this far ahead (and after iat/nbf): a token that never expires is a stolen token's best friend
    max_lifetime_s: float = field(default=7 * 86400.0, metadata={"gt": 0})
    rpm: int | None = field(default=None, metadata={"gt": 0})
    tpm: int | None = field(default=None, metadata={"gt": 0})

    def validate(self) -> None:
        if not self.enabled:
            return
        if not self.audience or not self.issuer:
            raise ConfigError("auth.jwt: audience and issuer are required (both are checked on every token)")
        algs = set(self.algorithms)
        if not algs or not algs <= _HMAC_ALGS | _PUBKEY_ALGS:
            raise ConfigError(
                f"auth.jwt.algorithms: expected some of {sorted(_HMAC_ALGS | _PUBKEY_ALGS)}, got {self.algorithms}"
            )
        # One key type only: mixing HS* with a public key is the classic algorithm-confusion hole.
        if algs <= _HMAC_ALGS:
            if not self.secret_env or self.public_key_file:
                raise ConfigError("auth.jwt: HS* algorithms need secret_env (and no public_key_file)")
        elif algs <= _PUBKEY_ALGS:
            if not self.public_key_file or self.secret_env:
                raise ConfigError("auth.jwt: public-key algorithms need public_key_file (and no secret_env)")
        else:
            raise ConfigError("auth.jwt.algorithms: do not mix HS* with public-key algorithms")


@dataclass
class AuthConfig:
    required: bool = True  # false: anonymous access, allowed on a loopback address only
    keys_file: Path = DEFAULT_KEYS_FILE
    jwt: JWTConfig = field(default_factory=JWTConfig)


@dataclass
class GuardConfig:
    input: Literal["off", "flag", "block"] = "block"  # prompt-injection / jailbreak / special-token patterns
    output: Literal["off", "redact"] = "redact"  # PII and secrets in generated text
    # Streamed characters held back so a secret split across tokens is caught whole; a secret longer
    # than this (a PEM block) can leak in part while streaming. Lower = snappier streams.
    holdback: int = field(default=256, metadata={"gt": 0})
    extra_patterns: list[str] = field(default_factory=list)  # more input regexes (case-insensitive)


@dataclass
class EmbeddingsConfig:
    """How /v1/embeddings turns the last hidden state into one vector per input."""

    pooling: Literal["mean", "last"] = "mean"  # mean over the input's tokens, or its last token
    normalize: bool = True  # unit length, as OpenAI's embeddings


@dataclass
class AuditConfig:
    path: Path | None = None  # JSONL, one line per request; None: no audit log
    log_prompts: bool = False  # prompt and completion text in the log (off: counts and verdicts only)


@dataclass
class ServeConfig:
    model_name: str | None = None  # id shown in /v1/models; default: the model directory's name
    dtype: Literal["float32", "bfloat16"] = "float32"
    torch_threads: int | None = field(default=None, metadata={"gt": 0})  # None: torch's default (all cores)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    drain_timeout_s: float = field(default=60.0, metadata={"gt": 0})  # SIGTERM: wait this long for in-flight requests
