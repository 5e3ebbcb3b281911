"""The detectors behind `yunque.data.pii.scan`: patterns, cheap gates and validation.

Each detector is `fn(text, add)` and calls `add(type, start, end)` for validated spans;
`pii.scan` resolves overlaps. Boundaries are ASCII on purpose: in Chinese text an
identifier sits right next to CJK characters, which `\\w` would count as word characters.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

from yunque.data import pii_checks as ck

Add = Callable[[str, int, int], None]
_L = r"(?<![0-9A-Za-z_])"  # ASCII word boundary on the left
_R = r"(?![0-9A-Za-z_])"
_LN = r"(?<![0-9A-Za-z_.\-])"  # ... and not continuing a dotted/dashed number
_RN = r"(?![0-9A-Za-z_]|[.\-]\d)"


def _before(text: str, start: int, width: int = 32) -> str:
    return text[max(0, start - width) : start].lower()


_PLACEHOLDER = re.compile(
    r"^[*xX.\-_#•]+$|<[^>]*>|\$\{|\{\{|%\(|%s\b|\*\*\*|xxxx|\.\.\.|^\$[A-Za-z_]"
    r"|your[_\- ]|changeme|redacted|placeholder|example\.(?:com|org)",
    re.I,
)


# --- PEM private keys ------------------------------------------------------------

_PEM_BEGIN = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----")
_PEM_BODY = re.compile(r"(?:\\n|\s|[A-Za-z0-9+/=]|(?:[\w-]+: [^\n]*))*")


def private_keys(text: str, add: Add) -> None:
    if "PRIVATE KEY" not in text:
        return
    for m in _PEM_BEGIN.finditer(text):
        end_marker = f"-----END {m.group(1)}-----"
        j = text.find(end_marker, m.end(), m.end() + 20000)
        # A truncated block (no END yet, e.g. mid-stream) is redacted through its body.
        end = j + len(end_marker) if j >= 0 else _PEM_BODY.match(text, m.end()).end()
        add("PRIVATE_KEY", m.start(), end)


# --- vendor tokens and JWTs: each starts with a literal, so the gates are `in` tests --

_GITHUB = re.compile(_L + r"(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{60,251})" + _R)
_GITLAB = re.compile(_L + r"gl(?:pat|dt|rt|ptt|ft|cbt|soat|imt)-[A-Za-z0-9_\-]{20,80}" + _R)
_SLACK = re.compile(
    _L + r"xox[abposr]-[0-9A-Za-z\-]{10,250}" + _R + r"|xapp-\d-[A-Z0-9]+-\d+-[a-z0-9]{32,}"
    r"|https://hooks\.slack\.com/(?:services|workflows|triggers)/T[A-Z0-9]+/[A-Za-z0-9/]{8,}"
)
_AWS_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])")
_JWT = re.compile(_L + r"(eyJ[A-Za-z0-9_\-]{8,})\.([A-Za-z0-9_\-]{4,})\.([A-Za-z0-9_\-]*)" + r"(?![A-Za-z0-9_\-])")
_AWS_PREFIXES = ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA", "ABIA", "ACCA")


def _random_enough(s: str) -> bool:
    # Documentation placeholders ("ghp_xxxx…", "glpat-XXXXXXXX…") are not secrets.
    return len(set(s)) >= 8 and not _PLACEHOLDER.search(s)


def tokens(text: str, add: Add) -> None:
    if "gh" in text:
        for m in _GITHUB.finditer(text):
            if _random_enough(m.group().split("_", 1)[1]):
                add("GITHUB_TOKEN", *m.span())
    if "gl" in text:
        for m in _GITLAB.finditer(text):
            if _random_enough(m.group()[6:]):
                add("GITLAB_TOKEN", *m.span())
    if "xox" in text or "xapp-" in text or "hooks.slack.com" in text:
        for m in _SLACK.finditer(text):
            if _random_enough(m.group()[5:]):
                add("SLACK_TOKEN", *m.span())
    if any(p in text for p in _AWS_PREFIXES):
        for m in _AWS_ID.finditer(text):
            add("AWS_ACCESS_KEY", *m.span())
    if "eyJ" in text:
        for m in _JWT.finditer(text):
            if ck.jwt_header_ok(m.group(1)):
                add("JWT", *m.span())


# --- e-mail and URL credentials: anchored on '@' / '://' and grown outwards ------------

_EMAIL_DOMAIN = re.compile(
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})(?![A-Za-z0-9\-]|\.[A-Za-z0-9])"
)
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+\-]{1,64}\Z")
# "icon@2x.png" is an asset name; a TLD that is a common file extension is not an address.
_FILE_EXT = frozenset("png jpg jpeg gif svg webp ico css js ts map json pdf zip txt html md py".split())


def emails(text: str, add: Add) -> None:
    if "@" not in text:
        return
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        lm = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        if lm is None or m.group(1).rsplit(".", 1)[1].lower() in _FILE_EXT:
            continue
        s = lm.start()
        while s < at and text[s] in ".-+":  # a local part cannot start with punctuation
            s += 1
        if s < at and text[at - 1] != ".":
            add("EMAIL", s, m.end())


_URL_CRED = re.compile(r"://([^\s/?#@:\"'<>]{1,128}):([^\s/?#@\"'<>]{1,256})@(?=[A-Za-z0-9\[])")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{1,20}\Z")


def url_credentials(text: str, add: Add) -> None:
    if "://" not in text:
        return
    for m in _URL_CRED.finditer(text):
        if _SCHEME.search(text, max(0, m.start() - 21), m.start()) and not _PLACEHOLDER.search(m.group(2)):
            add("URL_CREDENTIALS", m.start(1), m.end(2))


# --- secrets assigned to key / token / password names ---------------------------------

_SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "auth", "credential", "contraseña", "contrasena",
                 "senha", "clave", "密码", "口令", "密钥", "令牌")  # fmt: skip
_NAME_BACK = re.compile(r"[\w.\-]{0,48}\Z")
_ASSIGN = re.compile(
    r"""([\w.\-]{1,80})["']?[ \t]*(?:=>|:=|[:=：])[ \t]*"""
    r"""(?:"([^"\\\n]{1,400})"|'([^'\\\n]{1,400})'|`([^`\n]{1,400})`|([^\s"'`,;#)}\]<>]{1,400}))"""
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
    "version provider store manager source ref fingerprint algorithm alg method strategy".split()
)  # fmt: skip
_CODE_VALUE = re.compile(
    r"^(?:none|null|nil|true|false|undefined|str|string|bytes|int|optional|required|secret|password)$"
    r"|^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$|[(\[]|^[$%{&*@]",
    re.I,
)
_WORDLIKE = re.compile(r"^[A-Za-z]+(?:[_\-. ][A-Za-z]+)*$")
_AWS_SECRET = re.compile(r"^[A-Za-z0-9/+]{40}$")


def _name_kind(name: str) -> str | None:
    if any(w in name for w in ("密码", "口令")):
        return "password"
    if any(w in name for w in ("密钥", "令牌")):
        return "secret"
    segs = [s.lower() for s in re.split(r"[_\-.\s]+", _CAMEL.sub("_", name)) if s]
    if not segs or _META_SEGS.intersection(segs):
        return None
    if _PASSWORD_SEGS.intersection(segs):
        return "password"
    if _SECRET_SEGS.intersection(segs):
        return "secret"
    return None


def _secret_value_ok(val: str, kind: str, quoted: bool) -> bool:
    if len(val) < 6 or any(c.isspace() for c in val) or _PLACEHOLDER.search(val):
        return False
    if not quoted and (_CODE_VALUE.search(val) or _WORDLIKE.match(val)):
        return False
    if kind == "password":
        return quoted or any(c.isdigit() for c in val) or not val.isalnum()
    # Keys and tokens are machine-generated: long and high-entropy, never plain words.
    return len(val) >= 12 and not _WORDLIKE.match(val) and ck.shannon_entropy(val) >= 3.0


def secret_assignments(text: str, add: Add) -> None:
    lower = text.lower()
    hits = sorted({i for w in _SECRET_WORDS for i in _find_all(lower, w)})
    done = -1
    for i in hits:
        if i < done:
            continue
        back = _NAME_BACK.search(text, max(0, i - 48), i)
        m = _ASSIGN.match(text, back.start() if back else i)
        if m is None:
            continue
        done = m.end()
        kind = _name_kind(m.group(1))
        if kind is None:
            continue
        vg = next(g for g in (2, 3, 4, 5) if m.group(g) is not None)
        val, s, e = m.group(vg), m.start(vg), m.end(vg)
        if vg == 5 and val.lower() in ("bearer", "basic", "token"):  # "Authorization: Bearer <tok>"
            tm = re.compile(r"[ \t]+([^\s\"'`,;]{6,400})").match(text, e)
            if tm is None:
                continue
            val, s, e = tm.group(1), tm.start(1), tm.end(1)
            vg = 2  # the token after the scheme word is as good as quoted
        if not _secret_value_ok(val, kind, vg != 5):
            continue
        name = m.group(1).lower()
        aws = "aws" in name and "secret" in name and _AWS_SECRET.match(val)
        add("AWS_SECRET_KEY" if aws else "SECRET_ASSIGNMENT", s, e)


def _find_all(hay: str, needle: str) -> list[int]:
    out, i = [], hay.find(needle)
    while i >= 0:
        out.append(i)
        i = hay.find(needle, i + 1)
    return out


# --- IP addresses --------------------------------------------------------------------

_IPV4 = re.compile(_LN + r"(?:\d{1,3}\.){3}\d{1,3}" + _RN)
_VERSION_CTX = re.compile(
    r"(?:\bv|\bver\.?|version|versión|versao|versão|release|build|firmware|kernel|版本|oid)\s*[:=]?\s*$"
)


def _ip_is_personal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.is_loopback or ip.is_unspecified:
        return False
    if ip.version == 4:  # netmasks such as 255.255.255.0 are configuration, not addresses
        bits = int(ip)
        inv = ~bits & 0xFFFFFFFF
        return not (bits >> 24 == 255 and inv & (inv + 1) == 0)
    return True


def ipv4(text: str, add: Add) -> None:
    if "." not in text:
        return
    for m in _IPV4.finditer(text):
        try:
            ip = ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        if _ip_is_personal(ip) and not _VERSION_CTX.search(_before(text, m.start(), 20)):
            add("IPV4", *m.span())


_IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6_BACK = re.compile(r"[0-9A-Fa-f:]{0,40}\Z")
_IPV6 = re.compile(r"[0-9A-Fa-f:]{2,39}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?:%[0-9A-Za-z]{1,15})?")


def ipv6(text: str, add: Add) -> None:
    if "::" not in text and ":" not in text:
        return
    pos = 0
    for seed in _IPV6_SEED.finditer(text):
        if seed.start() < pos:
            continue
        back = _IPV6_BACK.search(text, max(0, seed.start() - 40), seed.start())
        s = back.start() if back else seed.start()
        if s and re.match(r"[0-9A-Za-z_:.]", text[s - 1]):
            continue
        m = _IPV6.match(text, s)
        if m is None:
            continue
        pos = m.end()
        if pos < len(text) and re.match(r"[0-9A-Za-z_]", text[pos]):
            continue
        cand = m.group().split("%", 1)[0]
        if cand.count(":") < 2:
            continue
        try:
            ip = ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        if _ip_is_personal(ip):
            add("IPV6", *m.span())


# --- crypto addresses ----------------------------------------------------------------

_BTC_LEGACY = re.compile(_L + r"[13][1-9A-HJ-NP-Za-km-z]{25,34}" + _R)
_BTC_BECH32 = re.compile(_L + r"(?:bc1|BC1)[0-9A-Za-z]{8,87}" + _R)
_ETH = re.compile(_L + r"0x([0-9a-fA-F]{40})" + _R)


def crypto_addresses(text: str, add: Add) -> None:
    for m in _BTC_LEGACY.finditer(text):
        if ck.base58check_ok(m.group()):
            add("BITCOIN_ADDRESS", *m.span())
    if "bc1" in text or "BC1" in text:
        for m in _BTC_BECH32.finditer(text):
            if ck.bech32_ok(m.group()):
                add("BITCOIN_ADDRESS", *m.span())
    if "0x" in text:
        for m in _ETH.finditer(text):
            if ck.eip55_ok(m.group(1)):
                add("ETHEREUM_ADDRESS", *m.span())

