"""Vendor API keys and tokens: each starts with a fixed prefix ("ghp_", "sk-proj-", "AKIA").

The rule shapes follow the public rule sets of gitleaks and detect-secrets (prefix, alphabet,
length); each match must also look machine-made (`_random_enough`), so "ghp_xxxx…" and
"sk_live_<your key>" in documentation are left alone. Documentation's own *example keys*
(AWS's AKIAIOSFODNN7EXAMPLE) are redacted like real ones: they have the exact shape of a
credential, a model gains nothing from memorising them, and an exception for them would be
an exception for every real key someone pastes next to the word "example".

Speed: a document is scanned once per trigger, not once per vendor. Prefixes that end in
"_" or "-" are found from that character with one lookbehind per prefix (`_`, `-` are rare
in prose, so `re` jumps between them), the rest from their first letter ('A', 'S'); the full
token pattern then runs only where a prefix is. Every pattern is a prefix plus bounded runs
of one character class: linear time on any input.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from yunque.data import pii_checks as ck
from yunque.data.pii_detect import _R, _left_ok

Add = Callable[[str, int, int], None]
_RD = r"(?![0-9A-Za-z_\-])"  # for alphabets that include '-': the token cannot stop before one


def _random_enough(s: str) -> bool:
    # Documentation placeholders ("ghp_xxxx…", "glpat-XXXXXXXX…", "sk_test_your_key_here").
    return len(set(s)) >= 8 and not ck.is_placeholder(s)


def _hex_id(body: str) -> bool:
    """Twilio's SK + 32 hex digits: one case, digits and letters both (hex of random bytes)."""
    return (body.islower() or body.isupper()) and any(c.isdigit() for c in body) and not body.isdigit()


@dataclass(frozen=True)
class _Rule:
    type: str
    prefix: str  # the literal every token of the rule starts with
    pattern: re.Pattern  # the whole token, matched where the prefix is
    skip: int  # characters of the token not checked for randomness (the fixed part)
    check: Callable[[str], bool] = _random_enough


def _rule(type_: str, prefix: str, body: str, skip: int | None = None, check=None, end: str = _R) -> _Rule:
    pat = re.compile(re.escape(prefix) + body + end)
    return _Rule(type_, prefix, pat, len(prefix) if skip is None else skip, check or _random_enough)


_GH = r"[A-Za-z0-9]{36,251}"
_GL = r"[A-Za-z0-9_\-]{20,300}(?:\.[0-9a-z]{2}\.?[0-9a-z]{7})?"  # newer tokens end in ".01.abcdefg"
_SLACK = r"[0-9A-Za-z\-]{10,250}"
_AWS = r"[A-Z0-9]{16}(?![A-Z0-9])"  # 20 characters in all
RULES: tuple[_Rule, ...] = (
    *(_rule("GITHUB_TOKEN", f"gh{c}_", _GH) for c in "pousr"),
    _rule("GITHUB_TOKEN", "github_pat_", r"[A-Za-z0-9_]{60,251}"),
    *(_rule("GITLAB_TOKEN", f"gl{k}-", _GL, end=_RD)
      for k in ("pat", "dt", "rt", "ptt", "ft", "cbt", "soat", "imt", "agent", "oas", "ffct")),
    *(_rule("SLACK_TOKEN", f"xox{c}-", _SLACK, end=_RD) for c in "abposre"),
    _rule("SLACK_TOKEN", "xapp-", r"\d-[A-Z0-9]{4,20}-\d{4,20}-[a-z0-9]{32,128}", end=_RD),
    _rule("SLACK_TOKEN", "hooks.slack.com/", r"(?:services|workflows|triggers)/T[A-Z0-9]{4,20}/[A-Za-z0-9/]{8,200}",
          skip=0, end=r"(?![A-Za-z0-9/])"),
    *(_rule("STRIPE_KEY", f"{c}k_{env}_", r"[A-Za-z0-9]{10,247}") for c in "sr" for env in ("live", "test", "prod")),
    _rule("ANTHROPIC_KEY", "sk-ant-", r"[a-z]{2,8}\d\d-[A-Za-z0-9_\-]{32,250}", end=_RD),
    *(_rule("OPENAI_KEY", f"sk-{k}-", r"[A-Za-z0-9_\-]{20,250}", end=_RD) for k in ("proj", "svcacct", "admin", "None")),
    _rule("OPENAI_KEY", "sk-", r"[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}"),  # "T3BlbkFJ": base64 of "OpenAI"
    *(_rule("AWS_ACCESS_KEY", p, _AWS, check=lambda s: True)
      for p in ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA")),
    _rule("AWS_ACCESS_KEY", "A3T", "[A-Z0-9]" + _AWS, check=lambda s: True),
    _rule("GOOGLE_API_KEY", "AIza", r"[0-9A-Za-z_\-]{35}", end=_RD),
    _rule("SENDGRID_KEY", "SG.", r"[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}", end=_RD),
    _rule("TWILIO_KEY", "SK", r"[0-9a-fA-F]{32}", check=_hex_id),
    _rule("NPM_TOKEN", "npm_", r"[A-Za-z0-9]{36}"),
    *(_rule("PYPI_TOKEN", "pypi-AgE", body + r"[A-Za-z0-9_\-]{50,1000}", skip=0, check=lambda s: True, end=_RD)
      for body in ("IcHlwaS5vcmc", "NdGVzdC5weXBpLm9yZw")),  # macaroons for pypi.org / test.pypi.org
    _rule("HUGGINGFACE_TOKEN", "hf_", r"[A-Za-z]{34}"),
)  # fmt: skip
TOKEN_TYPES: tuple[str, ...] = tuple(dict.fromkeys(r.type for r in RULES))


def _triggers(rules: tuple[_Rule, ...]) -> list[tuple[re.Pattern, bool, list[_Rule]]]:
    """(regex, at_end, rules): the regex finds where one of the rules' prefixes ends (at_end: at
    its last character, a separator) or starts (at its first character)."""
    by_sep: dict[str, list[_Rule]] = {}
    by_first: dict[str, list[_Rule]] = {}
    for r in rules:
        if r.prefix[-1] in "_-":
            by_sep.setdefault(r.prefix[-1], []).append(r)
        else:
            by_first.setdefault(r.prefix[0], []).append(r)
    out = []
    for sep, rs in by_sep.items():  # "_(?:(?<=ghp_)|(?<=npm_)|...)": starts with a literal, so `re` skips ahead
        prefixes = sorted({r.prefix for r in rs})
        rx = re.compile(re.escape(sep) + "(?:" + "|".join(f"(?<={re.escape(p)})" for p in prefixes) + ")")
        out.append((rx, True, rs))
    for first, rs in by_first.items():
        prefixes = sorted({r.prefix for r in rs}, key=len, reverse=True)
        if len(prefixes) == 1:  # the whole literal: `re` checks it without entering the matcher
            rx = re.compile(re.escape(prefixes[0]))
        else:
            rx = re.compile(re.escape(first) + "(?=" + "|".join(re.escape(p[1:]) for p in prefixes) + ")")
        out.append((rx, False, rs))
    return out


_TRIGGERS = _triggers(RULES)


def tokens(text: str, add: Add) -> None:
    aws_ids: list[int] = []
    for rx, at_end, rules in _TRIGGERS:
        done = 0
        for m in rx.finditer(text):
            i = m.start()
            if i < done:  # inside a token already reported ("github_pat_..._x_..." has more '_')
                continue
            for r in rules:
                start = i + 1 - len(r.prefix) if at_end else i
                if start < 0 or not text.startswith(r.prefix, start) or not _left_ok(text, start):
                    continue
                t = r.pattern.match(text, start)
                if t is not None and r.check(t.group()[r.skip :]):
                    add(r.type, start, t.end())
                    done = t.end()
                    if r.type == "AWS_ACCESS_KEY":
                        aws_ids.append(start)
                    break
    for m in _JWT.finditer(text):
        if ck.jwt_header_ok(m.group(1)):
            add("JWT", *m.span())
    aws_secrets_in_prose(text, aws_ids, add)


# The lookbehind sits after the literal so the prefix search still applies, and makes every
# "eyJ" inside a longer base64 run fail at once (otherwise "eyJeyJeyJ..." is quadratic).
_JWT = re.compile(r"(eyJ(?<![A-Za-z0-9_\-]eyJ)[A-Za-z0-9_\-]{8,}+)\.([A-Za-z0-9_\-]{4,}+)\.([A-Za-z0-9_\-]*+)")


# --- AWS secret access keys outside an assignment ---------------------------------------
# "the AWS secret key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY leaked", "AKIA… / wJalr…",
# `aws configure set aws_secret_access_key wJalr…`. A bare 40-character base64 run is far too
# common to take on its own (paths, hashes), so it needs both an AWS mention shortly before
# and either a "secret" word or the key id it belongs to.

_AWS_WORDS = ("AWS", "aws")
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_SECRET_WORD = re.compile(r"secret|secre[tc]|segredo|密钥|秘密|私钥|机密", re.IGNORECASE)
_AWS_REACH = 160  # characters after a mention where its secret may be


def _b64_at(text: str, i: int) -> bool:
    return i < len(text) and (text[i].isascii() and text[i].isalnum() or text[i] in "/+=")


def _aws_secret_shape(s: str) -> bool:
    # 30 random bytes in base64: all three classes (a miss has odds ~1e-3), few '/' and '+',
    # never "//" (a path), and high entropy (a random key has >= 4.1 bits per character).
    return (
        any(c.isupper() for c in s)
        and any(c.islower() for c in s)
        and any(c.isdigit() for c in s)
        and s.count("/") + s.count("+") <= 5
        and "//" not in s
        and ck.shannon_entropy(s) >= 4.0
        and not ck.is_placeholder(s)
    )


def aws_secrets_in_prose(text: str, aws_ids: list[int], add: Add) -> None:
    # Literal searches (a case-insensitive regex would test every character); the rare
    # document that mentions AWS pays the rest.
    anchors = set(aws_ids)
    for w in _AWS_WORDS:
        i = text.find(w)
        while i >= 0:
            if not (i and text[i - 1].isalpha()):  # "laws", "draws"
                anchors.add(i)
            i = text.find(w, i + 1)
    pos = 0
    for a in sorted(anchors):
        for c in _AWS_SECRET.finditer(text, max(a, pos), min(len(text), a + _AWS_REACH)):
            pos = c.end()
            if _b64_at(text, c.end()):  # the window's end cut a longer run
                continue
            before = text[max(0, c.start() - 100) : c.start()]
            paired = any(0 <= c.start() - i <= 120 for i in aws_ids)
            if _aws_secret_shape(c.group()) and (paired or _SECRET_WORD.search(before)):
                add("AWS_SECRET_KEY", *c.span())
