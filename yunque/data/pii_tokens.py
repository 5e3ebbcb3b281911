"""Vendor API keys and tokens: each starts with a fixed prefix ("ghp_", "sk-proj-", "AKIA").

The rule shapes follow the public rule sets of gitleaks and detect-secrets (prefix, alphabet,
length); each match must also look machine-made (`_random_enough`), so "ghp_xxxx…" and
"sk_live_<your key>" in documentation are left alone. Documentation's own *example keys*
(AWS's AKIAIOSFODNN7EXAMPLE) are redacted like real ones: they have the exact shape of a
credential, a model gains nothing from memorising them, and an exception for them would be
an exception for every real key someone pastes next to the word "example".

Speed: one regex pass per trigger character, not one per vendor. Prefixes that end in a
character rare in prose ("_", "-", "/", the "J" of a JWT's "eyJ") are found from it with a
lookbehind per prefix, the rest from their first letter ('A', 'S'); each alternative also
checks the token's first, bounded stretch, so Python only sees real candidates.

Linear time: the variable-length part of a token is a possessive run (`{20,}+`, its upper
bound checked afterwards), so a long run full of prefixes ("glpat-glpat-…") is read once,
and every prefix inside a judged run is skipped.
"""

from __future__ import annotations

import bisect
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


def _mixed_case(s: str) -> bool:
    # Hugging Face tokens are 34 random letters: "hf_transformersmodelcardandconfigs" is a name.
    return _random_enough(s) and not s.islower() and not s.isupper()


def _anything(s: str) -> bool:
    return True


@dataclass(frozen=True)
class _Rule:
    type: str
    prefix: str  # the literal every token of the rule starts with
    pattern: re.Pattern  # the whole token, matched where the prefix is
    head: str  # regex for the bounded start of what follows the prefix (checked by the trigger)
    max_len: int  # longest token of the kind (the pattern's runs are unbounded, see above)
    skip: int  # characters of the token not checked for randomness (the fixed part)
    check: Callable[[str], bool]
    left: str = ""  # characters besides ASCII word ones that may not precede the token


_OPEN_RUN = re.compile(r"\{(\d+),\}\+")


def _rule(type_: str, prefix: str, body: str, max_len: int = 0, skip: int | None = None, check=None, end=_R,
          left: str = "") -> _Rule:  # fmt: skip
    """`body`: what follows the prefix; a `{n,}+` run in it makes the token variable-length, up to
    `max_len` characters in all (a fixed-length body needs no max_len)."""
    run = _OPEN_RUN.search(body)
    # The trigger looks at the head only up to the first open run's minimum: bounded work per trigger.
    head = body[: run.start()] + "{" + run.group(1) + "}" if run else body + end
    return _Rule(type_, prefix, re.compile(re.escape(prefix) + body + end), head, max_len if run else 10**6,
                 len(prefix) if skip is None else skip, check or _random_enough, left)  # fmt: skip


def _jwt(token: str) -> bool:
    return ck.jwt_header_ok(token.split(".", 1)[0])


_GH = r"[A-Za-z0-9]{36,}+"
_GL = r"[A-Za-z0-9_\-]{20,}+(?:\.[0-9a-z]{2}\.?[0-9a-z]{7})?"  # newer tokens end in ".01.abcdefg"
_AWS = r"[A-Z0-9]{16}(?![A-Z0-9])"  # 20 characters in all
RULES: tuple[_Rule, ...] = (
    *(_rule("GITHUB_TOKEN", f"gh{c}_", _GH, 255) for c in "pousr"),
    _rule("GITHUB_TOKEN", "github_pat_", r"[A-Za-z0-9_]{60,}+", 262),
    *(_rule("GITLAB_TOKEN", f"gl{k}-", _GL, 330, end=_RD)
      for k in ("pat", "dt", "rt", "ptt", "ft", "cbt", "soat", "imt", "agent", "oas", "ffct")),
    *(_rule("SLACK_TOKEN", f"xox{c}-", r"[0-9A-Za-z\-]{10,}+", 260, end=_RD) for c in "abposre"),
    _rule("SLACK_TOKEN", "xapp-", r"\d-[A-Z0-9]{4,20}-\d{4,20}-[a-z0-9]{32,}+", 200, end=_RD),
    _rule("SLACK_TOKEN", "hooks.slack.com/", r"(?:services|workflows|triggers)/T[A-Z0-9]{4,20}/[A-Za-z0-9/]{8,}+", 260,
          skip=0, end="", left="."),
    *(_rule("STRIPE_KEY", f"{c}k_{env}_", r"[A-Za-z0-9]{10,}+", 260) for c in "sr" for env in ("live", "test", "prod")),
    _rule("ANTHROPIC_KEY", "sk-ant-", r"[a-z]{2,8}\d\d-[A-Za-z0-9_\-]{32,}+", 300, end=_RD),
    *(_rule("OPENAI_KEY", f"sk-{k}-", r"[A-Za-z0-9_\-]{20,}+", 300, end=_RD)
      for k in ("proj", "svcacct", "admin", "None")),
    _rule("OPENAI_KEY", "sk-", r"[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}"),  # "T3BlbkFJ": base64 of "OpenAI"
    *(_rule("AWS_ACCESS_KEY", p, _AWS, check=_anything)
      for p in ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA")),
    _rule("AWS_ACCESS_KEY", "A3T", "[A-Z0-9]" + _AWS, check=_anything),
    _rule("GOOGLE_API_KEY", "AIza", r"[0-9A-Za-z_\-]{35}", end=_RD),
    _rule("SENDGRID_KEY", "SG.", r"[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}", end=_RD),
    _rule("TWILIO_KEY", "SK", r"[0-9a-fA-F]{32}", check=_hex_id),
    _rule("NPM_TOKEN", "npm_", r"[A-Za-z0-9]{36}"),
    # macaroons for pypi.org / test.pypi.org: the base64 of their fixed header is part of the prefix
    _rule("PYPI_TOKEN", "pypi-", r"AgE(?:IcHlwaS5vcmc|NdGVzdC5weXBpLm9yZw)[A-Za-z0-9_\-]{50,}+", 1100, skip=0,
          check=_anything, end=_RD),
    _rule("HUGGINGFACE_TOKEN", "hf_", r"[A-Za-z]{34}", check=_mixed_case),
    # header.payload.signature, the header base64 JSON ('{"' is "eyJ") with an "alg"
    _rule("JWT", "eyJ", r"[A-Za-z0-9_\-]{8,}+\.[A-Za-z0-9_\-]{4,}+\.[A-Za-z0-9_\-]*+", 10**5, skip=0, check=_jwt,
          end="", left="-"),
    # Not tokens: where an AWS secret access key may follow (see `aws_secrets_in_prose`).
    _rule("", "AWS", "", end="(?![A-Za-z])", check=_anything),
    _rule("", "aws_", "", check=_anything, end=""),
)  # fmt: skip
TOKEN_TYPES: tuple[str, ...] = tuple(dict.fromkeys(r.type for r in RULES if r.type))
_SEPARATORS = "_-/J"  # prefixes that end in one of these are found from it

_Lookup = list[tuple[int, dict[str, list[_Rule]]]]  # (prefix length, rules by prefix), longest first


def _triggers(rules: tuple[_Rule, ...]) -> list[tuple[re.Pattern, bool, _Lookup]]:
    """(regex, at_end, lookup): the regex finds where one of the rules' prefixes ends (at_end: at
    its last character, one of `_SEPARATORS`) or starts (at its first), with its head after it."""
    by_sep: dict[str, list[_Rule]] = {}
    by_first: dict[str, list[_Rule]] = {}
    for r in rules:
        if r.prefix[-1] in _SEPARATORS:
            by_sep.setdefault(r.prefix[-1], []).append(r)
        else:
            by_first.setdefault(r.prefix[0], []).append(r)
    out = []
    for sep, rs in by_sep.items():  # "_(?:(?<=ghp_)(?=head)|...)": a literal first, so `re` skips ahead
        # Every such prefix has a lower-case letter before its separator: one check turns away
        # the separators of prose and runs ("2024-03-15", "-----") before the alternatives.
        assert all(r.prefix[-2].islower() for r in rs), "a prefix breaks the (?<=[a-z]sep) pre-check"
        alts = "|".join(f"(?<={re.escape(r.prefix)})(?={r.head})" for r in rs)
        out.append((re.compile(f"{re.escape(sep)}(?<=[a-z]{re.escape(sep)})(?:{alts})"), True, _lookup(rs)))
    for first, rs in by_first.items():
        if len(rs) == 1:  # the whole literal: `re` checks it without entering the matcher
            out.append((re.compile(re.escape(rs[0].prefix)), False, _lookup(rs)))
            continue
        alts = "|".join(re.escape(r.prefix[1:]) + r.head for r in rs)
        out.append((re.compile(f"{re.escape(first)}(?={alts})"), False, _lookup(rs)))
    return out


def _lookup(rules: list[_Rule]) -> _Lookup:
    by_len: dict[int, dict[str, list[_Rule]]] = {}
    for r in rules:
        by_len.setdefault(len(r.prefix), {}).setdefault(r.prefix, []).append(r)
    return sorted(by_len.items(), key=lambda kv: -kv[0])


_TRIGGERS = _triggers(RULES)
_TOKEN_RUN = re.compile(r"[A-Za-z0-9_\-]*+")


def tokens(text: str, add: Add) -> None:
    aws_ids: list[int] = []
    aws_words: list[int] = []
    for rx, at_end, lookup in _TRIGGERS:
        done = 0
        for m in rx.finditer(text):
            i = m.start()
            if i < done:  # inside a run already judged ("github_pat_…_…", "glpat-glpat-…")
                continue
            for n, by_prefix in lookup:
                start = i + 1 - n if at_end else i
                rules = by_prefix.get(text[start : start + n]) if start >= 0 else None
                if rules is None or not _left_ok(text, start, rules[0].left):
                    continue
                if not rules[0].type:
                    aws_words.append(start)
                    break
                hit = next(((r, t) for r in rules if (t := r.pattern.match(text, start)) is not None), None)
                if hit is None:  # its run was read and is no token: skip the prefixes inside it ("eyJeyJ…")
                    done = _TOKEN_RUN.match(text, start + n).end()
                    break
                r, t = hit
                done = t.end()
                if len(t.group()) <= r.max_len and r.check(t.group()[r.skip :]):
                    add(r.type, start, t.end())
                    if r.type == "AWS_ACCESS_KEY":
                        aws_ids.append(start)
                break
    if aws_ids or aws_words:
        aws_secrets_in_prose(text, sorted(aws_ids + aws_words), aws_ids, add)


# --- AWS secret access keys outside an assignment ---------------------------------------
# "the AWS secret key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY leaked", "AKIA… / wJalr…",
# `aws configure set aws_secret_access_key wJalr…`. A bare 40-character base64 run is far too
# common to take on its own (paths, hashes), so it needs an anchor shortly before it: the word
# "AWS", an `aws_` name or an access key id; and either a "secret" word or that key id.

_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_SECRET_WORD = re.compile(r"secre[tc]|secr[eè]t|segredo|密钥|秘密|私钥|机密", re.IGNORECASE)
_AWS_REACH = 160  # characters after a mention where its secret may be


def _b64_at(text: str, i: int) -> bool:
    return i < len(text) and (text[i].isascii() and text[i].isalnum() or text[i] in "/+=")


_TITLE_WORD = re.compile(r"[A-Z][a-z]{3,}")


def _aws_secret_shape(s: str) -> bool:
    # 30 random bytes in base64 (together these turn away ~0.2% of random keys): all three
    # classes (no digit: 1e-3), few '/' and '+' (more than 7: 1e-4; a path has many), high
    # entropy (a random key has >= 4.1 bits per character), and not CamelCase words (5+
    # capitalised words of 4+ letters: 7e-4).
    return (
        any(c.isupper() for c in s)
        and any(c.islower() for c in s)
        and any(c.isdigit() for c in s)
        and s.count("/") + s.count("+") <= 7
        and ck.shannon_entropy(s) >= 4.0
        and len(_TITLE_WORD.findall(s)) < 5
        and not ck.is_placeholder(s)
    )


def aws_secrets_in_prose(text: str, anchors: list[int], aws_ids: list[int], add: Add) -> None:
    """`anchors`: sorted starts of "AWS", `aws_` and key ids; `aws_ids`: sorted starts of key ids."""
    windows: list[list[int]] = []  # where a secret may be: the union of [anchor, anchor + reach)
    for a in anchors:
        if windows and a <= windows[-1][1]:
            windows[-1][1] = a + _AWS_REACH
        else:
            windows.append([a, a + _AWS_REACH])
    for lo, hi in windows:
        for c in _AWS_SECRET.finditer(text, lo, min(len(text), hi)):
            if _b64_at(text, c.end()):  # the window's end cut a longer run
                continue
            k = bisect.bisect_left(aws_ids, c.start() - 120)
            paired = k < len(aws_ids) and aws_ids[k] < c.start()  # its key id shortly before
            before = text[max(0, c.start() - 100) : c.start()]
            if _aws_secret_shape(c.group()) and (paired or _SECRET_WORD.search(before)):
                add("AWS_SECRET_KEY", *c.span())
