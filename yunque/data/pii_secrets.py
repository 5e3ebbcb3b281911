"""Secrets assigned to key / token / password names, in any common syntax.

`password = "hunter2xyz"`, `"api_key": "a8Kd2..."`, `DB_PASSWORD=...`, `token: ...` (YAML),
`?api_key=...` (query strings), `Authorization: Bearer ...`, and `name: X_TOKEN` / `value: ...`
pairs. Only the value is reported, so the placeholder keeps the name readable. Three names
give the value a more specific type when it has that type's exact shape: AWS secret access
keys (40 base64 characters), Azure account / shared access keys (base64 of 32 or 64 bytes)
and the `sig=` of an Azure shared access signature (URL-encoded base64 of an HMAC-SHA256).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import unquote

from yunque.data import pii_checks as ck

Add = Callable[[str, int, int], None]

_SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "auth", "credential", "contrase", "senha", "clave",
                 "密码", "口令", "密钥", "令牌")  # fmt: skip
_SECRET_WORD_RE = re.compile("|".join(_SECRET_WORDS))
_NAME_BACK = re.compile(r"[\w.\-]{0,48}\Z")
_NAME_BEFORE_OP = re.compile(r"""([\w.\-]{1,80})["']?[ \t]*[:=]?\Z""")
_SCHEME_WORD = re.compile(r"(?i)(?:bearer|basic|token)(?:[ \t]+|$)")
# Bounded name and possessive blanks: from each of many starts inside one long name or blank
# run, `+` / `[ \t]*` followed by `\s*` rescanned the rest of the run (quadratic).
_PAIR_VALUE = re.compile(r"""[\w.\-]{1,80}["']?[ \t]*+[,;]?\s*+(?:-[ \t]*)?["']?(value)["']?[ \t]*[:=]""")
_PAIR_NAME = re.compile(r"""(?:name|key)["']?[ \t]*[:=][ \t]*["']?([\w.\-]+)["']?[ \t]*[,;]?\s*(?:-[ \t]*)?["']?\Z""")
_AFTER_SCHEME = re.compile(r"[ \t]+([^\s\"'`,;]{6,400})")
_ASSIGN = re.compile(
    r"""([\w.\-]{1,80})["']?[ \t]*(?:=>|:=|[:=：])[ \t]*"""
    r"""(?:"([^"\\\n]{1,400})"|'([^'\\\n]{1,400})'|`([^`\n]{1,400})`|((?:(?!["'`,;#)}\]<>&])[!-~]){1,400}))"""
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_PASSWORD_SEGS = frozenset("password passwd pass pwd passphrase contraseña contrasena senha clave".split())
_SECRET_SEGS = frozenset("secret token key apikey secretkey accesskey privatekey auth credential credentials "
                         "bearer authorization".split())  # fmt: skip
# Names that talk *about* a secret rather than hold one (`max_tokens`, `password_hint`).
_META_SEGS = frozenset(
    "type types count num length len min max limit size id ids name names file path dir url uri endpoint env "
    "var field label hint prompt policy expiry expires expiration ttl timeout format pattern regex header param "
    "column mode kind prefix suffix index idx usage budget enabled required reset changed strength rotation "
    "version provider store manager source ref fingerprint algorithm alg method strategy config public template "
    "help description desc doc message msg error text title".split()
)  # fmt: skip
_CODE_VALUE = re.compile(
    r"^(?:none|null|nil|true|false|undefined|str|string|bytes|int|optional|required|secret|password)$"
    r"|^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$|[(\[]|^[$%{&*@]",
    re.IGNORECASE,
)
# single-case snake references with 3+ parts (`pkcs8_priv_key_info_st`) are code, not secrets
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9]*(?:_[a-z0-9]+){2,}$|^[A-Z_][A-Z0-9]*(?:_[A-Z0-9]+){2,}$")
# Property paths and type names held by `*_KEY` constants: 'fs.s3.consistent', 'AWS::Auth::Mode', 'Ec2SubnetIds'
_NAME_VALUE = re.compile(r"^(?:[A-Za-z][\w\-]*(?:(?:\.|::)[A-Za-z][\w\-]*)+|(?:[A-Z][a-z0-9]+){2,})$")
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_\-+/=.~:]+$")
_WORDLIKE = re.compile(r"^[_\-.]*[A-Za-z]+(?:[_\-. ]+[A-Za-z]+)*[_\-.]*$")
_AWS_SECRET = re.compile(r"^[A-Za-z0-9/+]{40}$")
_LETTER_RUN = re.compile(r"[A-Za-z]{16,}")
# The words of a CamelCase name: an acronym before a capitalised word, capitalised or lower-case
# words of 3+ letters. They cover a name ("SSHPrivateKeyTypes"); random letters leave gaps.
_CAMEL_WORD = re.compile(r"[A-Z]{2,}(?=[A-Z][a-z])|[A-Z][a-z]{2,}|[a-z]{3,}|[A-Z]{2,}$")


def _random_letters(val: str) -> bool:
    """A letters-only token ("key-YoQukEIfiCweQDRGYcxSolyd": 1 in 70 random 24-character
    tokens has no digit) rather than words: a run of 16+ letters with both cases in even
    measure, few vowels (English words and CamelCase names have ~38%, random letters 19%) and
    not made of CamelCase words."""
    m = _LETTER_RUN.search(val)
    if m is None:
        return False
    run = m.group()
    upper = sum(c.isupper() for c in run) / len(run)
    vowels = sum(c in "aeiouAEIOU" for c in run) / len(run)
    words = sum(map(len, _CAMEL_WORD.findall(run))) / len(run)
    return 0.3 <= upper <= 0.7 and vowels <= 0.3 and words < 0.95


def _wordlike(val: str) -> bool:
    return _WORDLIKE.match(val) is not None and not _random_letters(val)


def _name_kind(name: str) -> str | None:
    if any(w in name for w in ("密码", "口令")):
        return "password"
    if any(w in name for w in ("密钥", "令牌")):
        return "secret"
    segs = [s.lower() for s in re.split(r"[_\-.\s]+", _CAMEL.sub("_", name)) if s]
    if not segs or _META_SEGS.intersection(segs):
        return None
    if segs == ["sig"]:  # alone it means many things; only an Azure SAS signature is taken (`_sas_sig`)
        return "sas"
    if _PASSWORD_SEGS.intersection(segs):
        return "password"
    if _SECRET_SEGS.intersection(segs):
        return "secret"
    return None


def _secret_value_ok(val: str, kind: str, quoted: bool, bare_key: bool = False) -> bool:
    """`bare_key`: the name is just "key" (dict, sort or cache key in code): quoted values only."""
    if len(val) < 6 or any(c.isspace() for c in val) or ck.is_placeholder(val):
        return False
    if not quoted and (_CODE_VALUE.search(val) or _wordlike(val) or _IDENTIFIER.match(val) or bare_key):
        return False
    if kind == "password":
        # Letters only ("context", "challengePassword") is what code maps names to; a password
        # worth the name has a digit or a symbol.
        return not val.isalpha() and not _WORDLIKE.match(val) and not _NAME_VALUE.match(val)
    # Keys and tokens are machine-generated: long, high-entropy, from a token alphabet
    # (base64, base64url, hex), never plain words or expressions.
    return (
        len(val) >= 12
        and _TOKEN_CHARS.match(val) is not None
        and not _wordlike(val)
        and not _NAME_VALUE.match(val)
        and ck.shannon_entropy(val) >= 3.0
    )


def _sas_sig(val: str) -> bool:
    """The `sig` of an Azure shared access signature: base64 of a 32-byte HMAC, URL-encoded."""
    return ck.base64_bytes(unquote(val)) == 32


def _typed(name: str, val: str) -> str:
    """SECRET_ASSIGNMENT, or a more specific type that the name and the value's shape agree on."""
    low = name.lower()
    if "aws" in low and "secret" in low and _AWS_SECRET.match(val):
        return "AWS_SECRET_KEY"
    flat = re.sub(r"[_\-.]", "", low)
    azure = flat.endswith(("accountkey", "sharedaccesskey", "storagekey")) or "azure" in flat
    if azure and ck.base64_bytes(val) in (32, 64):
        return "AZURE_STORAGE_KEY"
    return "SECRET_ASSIGNMENT"


def secret_assignments(text: str, add: Add) -> None:
    # Two ways to find candidates, whichever is cheaper for this document: prose has few
    # ':'/'=' (visit each operator), code has many (look for the key words instead).
    ops = text.count("=") + text.count(":") + text.count("：")
    if not ops:
        return
    done = -1
    if ops * 400 <= len(text):
        starts = []
        for op in "=:：":
            i = text.find(op)
            while i >= 0:
                # An Azure SAS `sig=` is checked by its own name: "sig" as a key word would
                # wake this loop for every "design:" and "signal =".
                if op == "=" and text.startswith("sig", i - 3):
                    starts.append(i - 3)
                elif _SECRET_WORD_RE.search(text[max(0, i - 48) : i].lower()):  # cheap test first
                    back = _NAME_BEFORE_OP.search(text, max(0, i - 90), i)
                    if back and any(w in back.group(1).lower() for w in _SECRET_WORDS):
                        starts.append(back.start())
                i = text.find(op, i + 1)
        for start in sorted(starts):
            if start >= done:
                done = _assignment(text, start, add)
        return
    lower = text.lower()
    for i in sorted({i for w in (*_SECRET_WORDS, "sig=") for i in _find_all(lower, w)}):
        if i < done:  # inside the assignment just judged (its name starts at or before i)
            continue
        back = _NAME_BACK.search(text, max(0, i - 48), i)
        start = back.start() if back else i
        if start >= done:
            done = _assignment(text, start, add)


def _assignment(text: str, start: int, add: Add) -> int:
    """Judge the `name = value` at `start`; returns where scanning may resume."""
    if start and text[start - 1] == ":":  # "AWS::KMS::Key": a qualified type name, not a variable
        return start + 1
    m = _ASSIGN.match(text, start)
    if m is None:
        # `name: DEPLOY_TOKEN` followed by `value: ...` (Kubernetes, CI, JSON name/value pairs)
        pair = _PAIR_VALUE.match(text, start)
        return _assignment(text, pair.start(1), add) if pair else start + 1
    name = m.group(1)
    kind = _name_kind(name)
    if kind is None and name.lower() == "value":
        pm = _PAIR_NAME.search(text[max(0, start - 120) : start])
        kind = _name_kind(pm.group(1)) if pm else None
    if kind is None:
        return m.end()
    vg = next(g for g in (2, 3, 4, 5) if m.group(g) is not None)
    val, s, e = m.group(vg), m.start(vg), m.end(vg)
    scheme = _SCHEME_WORD.match(val)
    if scheme:  # "Authorization: Bearer <token>": the credential is what follows the scheme
        if vg == 5:
            tm = _AFTER_SCHEME.match(text, e)
            if tm is None:
                return m.end()
            val, s, e = tm.group(1), tm.start(1), tm.end(1)
            vg = 2  # a token after a scheme word is as good as quoted
        else:
            val, s = val[scheme.end() :], s + scheme.end()
    if kind == "sas":
        if _sas_sig(val):
            add("AZURE_SAS_TOKEN", s, e)
    elif _secret_value_ok(val, kind, vg != 5, name.lower().rsplit(".", 1)[-1].strip("-_") == "key"):
        add(_typed(name, val), s, e)
    return max(m.end(), e)


def _find_all(hay: str, needle: str) -> list[int]:
    out, i = [], hay.find(needle)
    while i >= 0:
        out.append(i)
        i = hay.find(needle, i + 1)
    return out
