"""Find and scrub personal data and secrets in text, for the data pipeline and the serving guard.

`scan(text)` returns typed, non-overlapping spans (never the values); `scrub(text, modes)`
replaces them with typed placeholders, counts them, or flags the document for dropping;
`StreamRedactor` does the same on a token stream by holding back a short tail.

Types and their placeholders (`PLACEHOLDERS`):
    EMAIL [EMAIL]  PHONE [PHONE]  IPV4 [IPV4]  IPV6 [IPV6]  CREDIT_CARD [CREDIT_CARD]  IBAN [IBAN]
    US_SSN [SSN]  ES_DNI [DNI]  ES_NIE [NIE]  MX_CURP [CURP]  MX_RFC [RFC]  BR_CPF [CPF]
    AR_CUIT [CUIT]  CL_RUT [RUT]  UK_NINO [NINO]  IT_FISCAL_CODE [CODICE_FISCALE]  CA_SIN [SIN]
    CN_RESIDENT_ID [CN_ID]  FR_NIR [NIR]  URL_CREDENTIALS [CREDENTIALS] (only the user:pass part)
    AWS_ACCESS_KEY [AWS_ACCESS_KEY]  AWS_SECRET_KEY [AWS_SECRET_KEY] (assigned, or in prose near "AWS")
    GITHUB_TOKEN [GITHUB_TOKEN]  GITLAB_TOKEN [GITLAB_TOKEN]  SLACK_TOKEN [SLACK_TOKEN]
    STRIPE_KEY  OPENAI_KEY  ANTHROPIC_KEY  GOOGLE_API_KEY  TWILIO_KEY  SENDGRID_KEY  NPM_TOKEN
    PYPI_TOKEN  HUGGINGFACE_TOKEN  AZURE_STORAGE_KEY  AZURE_SAS_TOKEN (the `sig`)  ([TYPE] each)
    JWT [JWT]  PRIVATE_KEY [PRIVATE_KEY] (whole PEM block)  SECRET_ASSIGNMENT [SECRET] (only the value)
    BITCOIN_ADDRESS [BTC_ADDRESS]  ETHEREUM_ADDRESS [ETH_ADDRESS]

Policy choices (general rules, each with its reason next to the code):
- Checksummed identifiers (cards, IBAN in any case, DNI/NIE, CURP, CPF, CUIT, RUT, codice
  fiscale, SIN, Chinese resident ID, NIR, BTC, mixed-case ETH) must validate; RFC needs a real
  date; SSN follows the SSA area/group/serial rules, NINO HMRC's prefix rules. Identifiers
  with no or a weak check need their name nearby unless written in their usual grouping
  (bare SSN/CPF/CUIT/NIR, compact NINO; a SIN always, a Luhn pass being one number in ten).
- E-mail local parts and domains may hold letters of any space-separated script (RFC 6531:
  josé.garcía@…); CJK/Thai runs glued to an address are the sentence, not the mailbox.
- Phones: "+cc"/"00cc" numbers need a valid country code; national formats need separators
  and are rejected inside number runs, after ID words ("order", "pedido", "订单"), next to
  currencies/units, or as year lists; bare digit runs count only near a phone word (or, for
  11-digit Chinese mobiles, right after CJK text). Unformatted SSN/CPF/CUIT need their name.
- IPs: loopback, unspecified, netmasks and CIDR network addresses are kept; dotted quads
  after version/section words are versions; quads whose first two parts are < 10 need a
  networking word nearby ("3.1.1.6" is far more often a version).
- Vendor keys and tokens (the prefixed kinds gitleaks and detect-secrets know) anywhere,
  when the part after the prefix looks random; documentation example keys such as
  AKIAIOSFODNN7EXAMPLE are redacted like real ones (see pii_tokens.py for why).
- Secrets: the value of a key/token/secret/password-like name (JSON, YAML, env, code, query
  string, `Authorization: Bearer`, name/value pairs), URL credentials (also `://:pass@`).
  Keys and tokens must look machine-made (token alphabet, >= 12 chars, entropy >= 3
  bits/char, not words or property paths); passwords need a digit or symbol. Placeholders
  (`<...>`, `${VAR}`, `xxxx`, `changeme`) and code (calls, attribute paths, `None`) are
  never secrets.

Speed: each full-text pass is a regex that starts with a literal (`re` jumps between
occurrences at memchr speed) or one digit-led pass; the ~30 digit-heavy patterns (phones,
cards, national IDs) only run in small windows around runs of >= 6 digits, the ~56 vendor
token rules share one pass per trigger character (pii_tokens.py), and secret assignments
are found from their operators or key words, whichever is rarer. Every pattern is linear
in its input (tests/data/test_pii.py times each detector on adversarial runs).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from yunque.data import pii_detect as _d
from yunque.data import pii_numeric as _n
from yunque.data import pii_secrets as _s
from yunque.data import pii_tokens as _t
from yunque.errors import ConfigError

PII_TYPES: tuple[str, ...] = (
    "EMAIL", "PHONE", "IPV4", "IPV6", "CREDIT_CARD", "IBAN", "US_SSN", "ES_DNI", "ES_NIE",
    "MX_CURP", "MX_RFC", "BR_CPF", "AR_CUIT", "CL_RUT", "UK_NINO", "IT_FISCAL_CODE", "CA_SIN",
    "CN_RESIDENT_ID", "FR_NIR", "URL_CREDENTIALS", "AWS_ACCESS_KEY", "AWS_SECRET_KEY",
    "GITHUB_TOKEN", "GITLAB_TOKEN", "SLACK_TOKEN", "STRIPE_KEY", "OPENAI_KEY", "ANTHROPIC_KEY",
    "GOOGLE_API_KEY", "AZURE_STORAGE_KEY", "AZURE_SAS_TOKEN", "TWILIO_KEY", "SENDGRID_KEY",
    "NPM_TOKEN", "PYPI_TOKEN", "HUGGINGFACE_TOKEN", "JWT", "PRIVATE_KEY", "SECRET_ASSIGNMENT",
    "BITCOIN_ADDRESS", "ETHEREUM_ADDRESS",
)  # fmt: skip

PLACEHOLDERS: dict[str, str] = {t: f"[{t}]" for t in PII_TYPES} | {
    "US_SSN": "[SSN]", "ES_DNI": "[DNI]", "ES_NIE": "[NIE]", "MX_CURP": "[CURP]", "MX_RFC": "[RFC]",
    "BR_CPF": "[CPF]", "AR_CUIT": "[CUIT]", "CL_RUT": "[RUT]", "UK_NINO": "[NINO]",
    "IT_FISCAL_CODE": "[CODICE_FISCALE]", "CA_SIN": "[SIN]", "CN_RESIDENT_ID": "[CN_ID]", "FR_NIR": "[NIR]",
    "URL_CREDENTIALS": "[CREDENTIALS]",
    "SECRET_ASSIGNMENT": "[SECRET]", "BITCOIN_ADDRESS": "[BTC_ADDRESS]",
    "ETHEREUM_ADDRESS": "[ETH_ADDRESS]",
}  # fmt: skip

# redact: replace with the placeholder; drop: discard the document (the data pipeline) and redact;
# report: count, leave in place; keep: not even scanned for.
MODES: tuple[str, ...] = ("redact", "drop", "report", "keep")
_MODE_WORDS = {"off": "keep", "false": "keep", "no": "keep", "true": "redact", "yes": "redact"}

# When two detectors claim overlapping text the more specific one wins: a PEM block beats
# everything inside it, a validated checksum beats a phone-shaped digit run.
_PRIORITY = {
    "PRIVATE_KEY": 100, "JWT": 90, "URL_CREDENTIALS": 86, **dict.fromkeys(_t.TOKEN_TYPES, 84),
    "AWS_SECRET_KEY": 82, "AZURE_STORAGE_KEY": 82, "AZURE_SAS_TOKEN": 82, "IBAN": 70,
    "CN_RESIDENT_ID": 69, "CREDIT_CARD": 68, "MX_CURP": 66, "IT_FISCAL_CODE": 65, "MX_RFC": 64,
    "FR_NIR": 63, "ES_NIE": 62, "ES_DNI": 61, "BR_CPF": 60, "AR_CUIT": 60, "UK_NINO": 59,
    "CL_RUT": 58, "US_SSN": 57, "CA_SIN": 56, "ETHEREUM_ADDRESS": 55, "BITCOIN_ADDRESS": 55,
    "EMAIL": 50, "IPV6": 45, "IPV4": 44, "SECRET_ASSIGNMENT": 30, "PHONE": 20,
}  # fmt: skip


@dataclass(frozen=True)
class Finding:
    """A typed span of `text[start:end]`; the value itself is never kept."""

    type: str
    start: int
    end: int


@dataclass
class ScrubResult:
    text: str
    findings: dict[str, int]  # type -> count, for reports (values are never exposed)
    drop: bool  # a type configured as "drop" fired: the caller should discard the document


Add = Callable[[str, int, int], None]
# Each detector reports (type, start, end) for every candidate it validated.
_DETECTORS: tuple[tuple[frozenset[str], Callable[[str, Add], None]], ...] = (
    (frozenset({"PRIVATE_KEY"}), _d.private_keys),
    (frozenset({"JWT", "AWS_SECRET_KEY", *_t.TOKEN_TYPES}), _t.tokens),
    (frozenset({"EMAIL"}), _d.emails),
    (frozenset({"URL_CREDENTIALS"}), _d.url_credentials),
    (frozenset({"SECRET_ASSIGNMENT", "AWS_SECRET_KEY", "AZURE_STORAGE_KEY", "AZURE_SAS_TOKEN"}), _s.secret_assignments),
    (frozenset({"IPV4"}), _d.ipv4),
    (frozenset({"IPV6"}), _d.ipv6),
    (frozenset({"BITCOIN_ADDRESS", "ETHEREUM_ADDRESS"}), _d.crypto_addresses),
    (frozenset(_n.NUMERIC_TYPES), _n.numeric_ids),
)


_ALL = frozenset(PII_TYPES)


def _wanted(types: Iterable[str] | None) -> frozenset[str]:
    if types is None:
        return _ALL
    wanted = frozenset(types)
    unknown = wanted - _ALL
    if unknown:
        raise ConfigError(f"unknown PII type(s) {sorted(unknown)}; known: {', '.join(PII_TYPES)}")
    return wanted


def scan(text: str, types: Iterable[str] | None = None) -> list[Finding]:
    """All PII/secret spans in `text` (restricted to `types`), non-overlapping, sorted by start."""
    wanted = _wanted(types)
    cands: list[tuple[int, int, int, str]] = []

    def add(t: str, s: int, e: int) -> None:
        if t in wanted and e > s:
            cands.append((-_PRIORITY[t], s - e, s, t))

    for det_types, fn in _DETECTORS:
        if det_types & wanted:
            fn(text, add)
    if not cands:
        return []
    # Greedy by priority then length; `starts`/`ends` keep the accepted spans sorted.
    cands.sort()
    starts: list[int] = []
    ends: list[int] = []
    kept: list[Finding] = []
    for _, neg_len, s, t in cands:
        e = s - neg_len
        i = bisect.bisect_right(starts, s)
        if (i and ends[i - 1] > s) or (i < len(starts) and starts[i] < e):
            continue
        starts.insert(i, s)
        ends.insert(i, e)
        kept.insert(i, Finding(t, s, e))
    return kept


def mode_name(value: object, where: str) -> str:
    """A mode as people write it: any case; `off`, `false`, `no` and YAML's false mean keep
    (a bare `off` in YAML is the boolean false), `true` means redact."""
    if isinstance(value, bool):
        return "redact" if value else "keep"
    if isinstance(value, str):
        word = value.strip().lower()
        word = _MODE_WORDS.get(word, word)
        if word in MODES:
            return word
    raise ConfigError(f"{where}: expected one of {', '.join(MODES)} (or off/false for keep), got {value!r}")


def type_name(name: object, where: str) -> str:
    """A PII type in any case (`email`, `private-key`) -> its name in PII_TYPES."""
    t = str(name).strip().upper().replace("-", "_")
    if t not in _ALL:
        raise ConfigError(f"{where}: unknown type {name!r}; known: {', '.join(PII_TYPES)}")
    return t


class Modes(dict):
    """A complete, checked type -> mode mapping (`checked_modes`): `scrub` takes it as it is, which
    matters when it is called once per document."""

    def __init__(self, modes: dict[str, str]):
        super().__init__(modes)
        self.active = _active(modes)


def checked_modes(modes: dict[str, str] | None = None, default_mode: str = "redact") -> Modes:
    """Every type's mode: `modes` (types and modes in any spelling `type_name`/`mode_name` accept)
    over `default_mode`; ConfigError names a bad type or mode."""
    return Modes(_check_modes(modes, default_mode))


def _check_modes(modes: dict[str, str] | None, default_mode: str) -> dict[str, str]:
    if isinstance(modes, Modes):
        return modes
    return _checked_modes(tuple(sorted((str(k), v) for k, v in (modes or {}).items())), default_mode)


@functools.lru_cache(maxsize=64)  # the pipeline calls scrub() per document with the same modes
def _checked_modes(modes: tuple[tuple[str, str], ...], default_mode: str) -> dict[str, str]:
    out = dict.fromkeys(PII_TYPES, mode_name(default_mode, "pii default_mode"))
    for t, m in modes:
        out[type_name(t, f"pii modes.{t}")] = mode_name(m, f"pii modes.{t}")
    return out


def _active(modes: dict[str, str]) -> frozenset[str]:
    return frozenset(t for t, m in modes.items() if m != "keep")


def _apply(text: str, findings: list[Finding], modes: dict[str, str], counts: dict[str, int]) -> tuple[str, bool]:
    parts: list[str] = []
    pos = 0
    drop = False
    for f in findings:
        mode = modes[f.type]
        counts[f.type] = counts.get(f.type, 0) + 1
        drop |= mode == "drop"
        if mode in ("redact", "drop"):  # a dropped document is still redacted, in case it is kept
            parts.append(text[pos : f.start])
            parts.append(PLACEHOLDERS[f.type])
            pos = f.end
    parts.append(text[pos:])
    return "".join(parts), drop


def scrub(text: str, modes: dict[str, str] | None = None, default_mode: str = "redact") -> ScrubResult:
    """Redact / count / flag PII in `text`. `modes` maps a type to "redact", "drop", "report"
    or "keep" (see `mode_name` for the spellings accepted); types not named use `default_mode`.
    "keep" types are not even scanned for."""
    m = _check_modes(modes, default_mode)
    findings = scan(text, m.active if isinstance(m, Modes) else _active(m))
    counts: dict[str, int] = {}
    out, drop = _apply(text, findings, m, counts)
    return ScrubResult(out, counts, drop)


@dataclass
class StreamRedactor:
    """Redact a stream of text chunks (e.g. model output) with the same result as `scrub`
    on the concatenation, for matches shorter than `holdback` characters.

    `feed` returns what is safe to emit now: everything except the last `holdback`
    characters, and never part of a span that is still open. Text already emitted cannot be
    recalled, so "drop" acts like "redact" here; `dropped` tells the caller it fired.
    """

    modes: dict[str, str] | None = None
    holdback: int = 256
    default_mode: str = "redact"
    findings: dict[str, int] = field(default_factory=dict, init=False)  # type -> count so far
    dropped: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.holdback < 1:
            raise ConfigError(f"StreamRedactor holdback: expected > 0, got {self.holdback}")
        self._modes = _check_modes(self.modes, self.default_mode)
        self._types = _active(self._modes)
        self._ctx = ""  # already-emitted raw text, kept as left context for the detectors
        self._buf = ""  # raw text not yet emitted

    def feed(self, chunk: str) -> str:
        self._buf += chunk
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        off = len(self._ctx)
        full = self._ctx + self._buf
        found = [f for f in scan(full, self._types) if f.end > off]
        cut = len(full) if final else max(off, len(full) - self.holdback)
        for f in found:  # never split a span: stop before any span that reaches past the cut
            if f.end > cut:
                cut = max(off, min(cut, f.start))
                break
        emit = [Finding(f.type, max(f.start, off) - off, f.end - off) for f in found if f.end <= cut]
        out, drop = _apply(self._buf[: cut - off], emit, self._modes, self.findings)
        self.dropped |= drop
        self._ctx = full[:cut][-self.holdback :]
        self._buf = full[cut:]
        return out


def evaluate_spans(cases: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Per-type precision/recall of `scan` on labelled cases `{"text", "spans": [{type, start, end}]}`.

    Span-level with exact type match; a prediction and a gold span that overlap are a hit.
    """
    tp_p: dict[str, int] = {}
    tp_g: dict[str, int] = {}
    n_pred: dict[str, int] = {}
    n_gold: dict[str, int] = {}
    for case in cases:
        pred = scan(case["text"])
        gold = case["spans"]
        for p in pred:
            n_pred[p.type] = n_pred.get(p.type, 0) + 1
            if any(g["type"] == p.type and g["start"] < p.end and p.start < g["end"] for g in gold):
                tp_p[p.type] = tp_p.get(p.type, 0) + 1
        for g in gold:
            n_gold[g["type"]] = n_gold.get(g["type"], 0) + 1
            if any(g["type"] == p.type and g["start"] < p.end and p.start < g["end"] for p in pred):
                tp_g[g["type"]] = tp_g.get(g["type"], 0) + 1
    out = {}
    for t in PII_TYPES:
        np_, ng = n_pred.get(t, 0), n_gold.get(t, 0)
        out[t] = {
            "precision": tp_p.get(t, 0) / np_ if np_ else 1.0,
            "recall": tp_g.get(t, 0) / ng if ng else 1.0,
            "n_pred": np_,
            "n_gold": ng,
        }
    return out
