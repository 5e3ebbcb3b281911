"""`DataConfig`: every option of `yunque data prepare`, loaded strictly from YAML (see yunque.config).

Example data.yaml for Alpaca's seed tasks (one instruction, several `instances`):

    read:
      format: alpaca
      explode: instances
    pii:
      modes: {private_key: drop, email: keep}   # any case; keep = off = false
    split: {seed: 7}
    canaries: {count: 8, rate: 0.01}   # plant 8 canaries into 1% of the training records

Every option can also be set on the command line after the inputs, as `train` takes them:
`yunque data prepare in.jsonl --out data pii.modes.email=keep split.seed=7`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from yunque.data.pii import PII_TYPES, Modes, checked_modes, mode_name, type_name
from yunque.errors import ConfigError

Format = Literal["auto", "alpaca", "chat", "completion", "text", "classification"]


@dataclass
class ReadConfig:
    format: Format = "auto"
    fields: dict[str, str] = field(default_factory=dict)  # canonical name -> dotted source path
    explode: str | None = None  # list field whose elements become records (over their parent's fields)
    text_unit: Literal["file", "block"] = "block"  # plain text: one document per file or per blank-line block
    on_error: Literal["skip", "fail"] = "skip"
    max_examples: int = field(default=5, metadata={"ge": 0})


@dataclass
class CleanConfig:
    normalize: bool = True  # NFC, control/invisible characters out, whitespace normalised
    min_chars: int = field(default=1, metadata={"ge": 0})
    max_chars: int = field(default=1_000_000, metadata={"gt": 0})
    min_tokens: int = field(default=0, metadata={"ge": 0})  # token limits apply only with a tokenizer
    max_tokens: int | None = field(default=None, metadata={"gt": 0})


@dataclass
class DedupConfig:
    exact: bool = True
    near: Literal["remove", "group", "off"] = "remove"  # group: keep near duplicates, same split
    threshold: float = field(default=0.8, metadata={"gt": 0, "le": 1})
    num_perm: int = field(default=128, metadata={"ge": 16})
    shingle_size: int = field(default=5, metadata={"gt": 0})
    seed: int = field(default=1, metadata={"ge": 0, "lt": 2**32})  # numpy and datasketch seeds are 32-bit


# What `data prepare` does with each type unless `pii.modes` says otherwise, and why.
# Secrets and credentials: redacted. A model that memorises a live key or token gives it to anyone who
# asks, and a sample is never about the key's value (the placeholder keeps its place and type).
SECRET_TYPES = (
    "PRIVATE_KEY",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "GITHUB_TOKEN",
    "GITLAB_TOKEN",
    "SLACK_TOKEN",
    "STRIPE_KEY",
    "OPENAI_KEY",
    "ANTHROPIC_KEY",
    "GOOGLE_API_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_SAS_TOKEN",
    "TWILIO_KEY",
    "SENDGRID_KEY",
    "NPM_TOKEN",
    "PYPI_TOKEN",
    "HUGGINGFACE_TOKEN",
    "JWT",
    "SECRET_ASSIGNMENT",
    "URL_CREDENTIALS",
)
# Identifiers of a person or an account: redacted. They name someone; a model should learn what to do
# with them, not the values. Where the identifier is the evidence (a phishing sender, a scam wallet):
# pii.modes.email=keep (or bitcoin_address, ethereum_address).
PERSONAL_TYPES = (
    "EMAIL",
    "PHONE",
    "CREDIT_CARD",
    "IBAN",
    "US_SSN",
    "ES_DNI",
    "ES_NIE",
    "MX_CURP",
    "MX_RFC",
    "BR_CPF",
    "AR_CUIT",
    "CL_RUT",
    "UK_NINO",
    "IT_FISCAL_CODE",
    "CA_SIN",
    "CN_RESIDENT_ID",
    "FR_NIR",
    "BITCOIN_ADDRESS",
    "ETHEREUM_ADDRESS",
)
# IP addresses: kept and counted in the report. In logs, alerts and threat reports they are what a
# security model reasons about (attacker, scanner, victim host), and mostly servers rather than people;
# pii.modes.ipv4=redact (and ipv6) for data where they identify users, e.g. web access logs.
NETWORK_TYPES = ("IPV4", "IPV6")
PII_DEFAULTS: dict[str, str] = (
    dict.fromkeys(SECRET_TYPES, "redact")
    | dict.fromkeys(PERSONAL_TYPES, "redact")
    | dict.fromkeys(NETWORK_TYPES, "report")
)


@dataclass
class PIIConfig:
    """Modes: redact (typed placeholder such as [EMAIL]), drop (discard the record), report (count
    only, leave in place), keep (not scanned; also written off, false or no). Types and modes in any
    case; see PII_DEFAULTS for each type's default and why."""

    enabled: bool = True  # false: no scanning at all
    default_mode: str | bool | None = None  # a mode for every type `modes` does not name (None: PII_DEFAULTS)
    modes: dict[str, str | bool] = field(default_factory=dict)  # per type, e.g. {email: keep, private_key: drop}

    def __post_init__(self) -> None:
        # Canonical spellings, so that the manifest records one form and errors name the key.
        if self.default_mode is not None:
            self.default_mode = mode_name(self.default_mode, "pii.default_mode")
        modes = {}
        for t, m in self.modes.items():
            modes[type_name(t, f"pii.modes.{t}")] = mode_name(m, f"pii.modes.{t}")
        self.modes = modes

    def effective(self) -> Modes:
        """The mode of every type."""
        base = PII_DEFAULTS if self.default_mode is None else dict.fromkeys(PII_TYPES, self.default_mode)
        return checked_modes({**base, **self.modes})


@dataclass
class SplitConfig:
    train: float = field(default=0.8, metadata={"ge": 0})
    val: float = field(default=0.1, metadata={"ge": 0})
    test: float = field(default=0.1, metadata={"ge": 0})
    seed: int = field(default=0, metadata={"ge": 0, "lt": 2**32})
    # True: exact per-label shares, stable only when records are appended (see data/split.py);
    # False: the pure content-hash split, stable under any insertion, per-label shares in expectation.
    stratify: bool = False
    oversample_ratio: float | None = field(default=None, metadata={"gt": 0, "le": 1})  # train only
    # What stratify and oversampling group records by: "label", a classification label or the `label`
    # field of a chat/alpaca/completion record (read.fields.label maps another field); "answer", the
    # final assistant message or completion (chat data whose answers are classes, e.g. triage verdicts).
    label_from: Literal["label", "answer"] = "label"

    def validate(self) -> None:
        if self.train + self.val + self.test <= 0:
            raise ConfigError("split: train + val + test must be > 0")


@dataclass
class CanaryConfig:
    """Canaries planted into the training split (see data/canary.py); count 0: off."""

    count: int = field(default=0, metadata={"ge": 0})  # distinct canaries
    rate: float = field(default=0.01, metadata={"gt": 0, "le": 1})  # fraction of training records carrying one
    seed: int = field(default=0, metadata={"ge": 0, "lt": 2**32})


@dataclass
class DataConfig:
    read: ReadConfig = field(default_factory=ReadConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    canaries: CanaryConfig = field(default_factory=CanaryConfig)
    tokenizer: Path | None = None  # a tokenizer directory: enables token limits and token shards
    workers: int = field(default=0, metadata={"ge": 0})  # 0: one per CPU core
    chunk_size: int = field(default=256, metadata={"gt": 0})

    def validate(self) -> None:
        if self.clean.max_tokens is not None and self.clean.max_tokens < self.clean.min_tokens:
            raise ConfigError("clean.max_tokens: must be >= clean.min_tokens")
        if self.clean.max_chars < self.clean.min_chars:
            raise ConfigError("clean.max_chars: must be >= clean.min_chars")
        if self.read.fields and set(self.read.fields) - _CANONICAL:
            bad = min(set(self.read.fields) - _CANONICAL)
            raise ConfigError(f"read.fields.{bad}: unknown field (known: {', '.join(sorted(_CANONICAL))})")


_CANONICAL = {
    "instruction",
    "input",
    "output",
    "system",
    "messages",
    "conversations",
    "prompt",
    "completion",
    "text",
    "label",
}
