"""The detectors behind `yunque.data.pii.scan`: patterns, cheap gates and validation.

Each detector is `fn(text, add)` and calls `add(type, start, end)` for validated spans;
`pii.scan` resolves overlaps. Boundaries are ASCII on purpose: in Chinese text an
identifier sits right next to CJK characters, which `\\w` would count as word characters.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import unicodedata
from collections.abc import Callable

from yunque.data import pii_checks as ck

Add = Callable[[str, int, int], None]
# Right-hand ASCII word boundary, and one that also refuses to end inside a dotted/dashed
# number. Left boundaries are checked in code (`_left_ok`): a leading lookbehind would stop
# `re` from jumping straight to a pattern's literal prefix.
_R = r"(?![0-9A-Za-z_])"
_RN = r"(?![0-9A-Za-z_]|[.\-]\d)"


def _before(text: str, start: int, width: int = 32) -> str:
    return text[max(0, start - width) : start].lower()


# --- PEM private keys ------------------------------------------------------------

_PEM_BEGIN = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----")
_PEM_BODY = re.compile(r"(?:\\n|\s|[A-Za-z0-9+/=]|(?:[\w-]+: [^\n]*))*")  # the body grammar
_PEM_END = re.compile(r"-----END ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----")
# `_PEM_BODY` taken apart: runs of body characters, then maybe a header line. Markers can
# nest inside header lines, and matching the body (or searching it for key material) from
# each of them rescanned the rest of the block: quadratic. The pieces let each text
# position be scanned once while giving exactly `_PEM_BODY`'s answer.
_PEM_SIMPLE = re.compile(r"(?:\\n|\s|[A-Za-z0-9+/=])*")
_PEM_HEADER = re.compile(r"[\w-]+: ")
_KEY_RUN = re.compile(r"[A-Za-z0-9+/=]{16,}")


def private_keys(text: str, add: Add) -> None:
    if "PRIVATE KEY" not in text:
        return
    ends: dict[str, list[int]] = {}  # label -> starts of its END markers (overlapping ones too)
    e = _PEM_END.search(text)
    while e is not None:
        ends.setdefault(e.group(1), []).append(e.start())
        e = _PEM_END.search(text, e.start() + 1)
    newlines = [n.start() for n in re.finditer("\n", text)]
    runs = [r.span() for r in _KEY_RUN.finditer(text)]
    memo: dict[int, int] = {}
    for m in _PEM_BEGIN.finditer(text):
        end_marker = f"-----END {m.group(1)}-----"
        at = ends.get(m.group(1), [])
        k = bisect.bisect_left(at, m.end())
        j = at[k] if k < len(at) and at[k] + len(end_marker) <= m.end() + 20000 else -1
        # A truncated block (no END yet, e.g. mid-stream) is redacted through its body.
        end = j + len(end_marker) if j >= 0 else _pem_body_end(text, m.end(), newlines, memo)
        if _has_key_material(runs, m.end(), end):  # two marker strings in code hold no key
            add("PRIVATE_KEY", m.start(), end)


def _pem_body_end(text: str, p: int, newlines: list[int], memo: dict[int, int]) -> int:
    """`_PEM_BODY.match(text, p).end()`: body runs and header lines; a header line ends at a
    newline, where the bodies of markers nested in it meet (`memo`)."""
    seen = []
    while p not in memo:
        seen.append(p)
        q = _PEM_SIMPLE.match(text, p).end()
        h = _PEM_HEADER.match(text, q)
        if h is None:
            memo[p] = q
            break
        k = bisect.bisect_left(newlines, h.end())
        p = newlines[k] if k < len(newlines) else len(text)
    end = memo[p]
    memo.update(dict.fromkeys(seen, end))
    return end


def _has_key_material(runs: list[tuple[int, int]], a: int, b: int) -> bool:
    """Does text[a:b] hold 16 key characters in a row? From the maximal runs of key characters (sorted)."""
    i = bisect.bisect_left(runs, a + 16, key=lambda r: r[1])  # the first run that can reach past a
    return i < len(runs) and max(runs[i][0], a) + 16 <= min(runs[i][1], b)


def _word_at(text: str, i: int) -> bool:
    """Is text[i] an ASCII word character (out of range counts as no)?"""
    if not 0 <= i < len(text):
        return False
    c = text[i]
    return c.isascii() and (c.isalnum() or c == "_")


def _left_ok(text: str, i: int, chars: str = "") -> bool:
    """May a match start at `i`: not glued to a word character (or one of `chars`) on its left?"""
    return i == 0 or not (_word_at(text, i - 1) or text[i - 1] in chars)


# --- e-mail and URL credentials: anchored on '@' / '://' and grown outwards ------------

# RFC 6531 mailboxes may use letters of any script: josé.garcía@…, müller@bücher.example.
# Letters of scripts that separate words with spaces are accepted (Latin, Greek, Cyrillic,
# Arabic, Hebrew, Indic...); CJK, Thai, Lao, Khmer and Myanmar are not, because there the
# address is glued to the sentence ("请发送邮件至ana@example.com") and the run before "@"
# is the sentence, not the mailbox.
_U = "\u00c0-\u0dff\u10a0-\u10ff\u1e00-\u1fff"
_EMAIL_DOMAIN = re.compile(
    rf"@((?:[A-Za-z0-9{_U}](?:[A-Za-z0-9\-{_U}]{{0,61}}[A-Za-z0-9{_U}])?\.)+"
    rf"(?:[A-Za-z]{{2,24}}|xn--[A-Za-z0-9\-]{{1,59}}|[{_U}]{{2,24}}))"
    rf"(?![A-Za-z0-9\-{_U}]|\.[A-Za-z0-9{_U}])"
)
_EMAIL_LOCAL = re.compile(rf"[A-Za-z0-9._%+\-{_U}]{{1,64}}\Z")
_IN_U = re.compile(f"[{_U}]")
_LOCAL_CHARS = frozenset("._%+-")
# "icon@2x.png" is an asset name; a TLD that is a common file extension is not an address.
_FILE_EXT = frozenset("png jpg jpeg gif svg webp ico css js ts map json pdf zip txt html md py".split())


def _letter(c: str) -> bool:
    """A non-ASCII letter or combining mark of the scripts `_U` covers (not '×', '÷', '،')."""
    return not c.isascii() and unicodedata.category(c)[0] in "LM"


def _local_start(text: str, s: int, at: int) -> int | None:
    """Where the local part that `_EMAIL_LOCAL` found at s..at really starts, or None."""
    if not text[s:at].isascii():
        for i in range(at - 1, s - 1, -1):  # a non-letter inside the range ends the local part
            if not text[i].isascii() and not _letter(text[i]):
                s = i + 1
                break
    prev = text[s - 1] if s else ""
    if prev and (_word_at(text, s - 1) or prev in _LOCAL_CHARS or (_IN_U.match(prev) and _letter(prev))):
        return None  # the run goes on to the left: longer than 64 characters, not an address
    while s < at and text[s] in ".-+":  # a local part cannot start with punctuation
        s += 1
    return s


def emails(text: str, add: Add) -> None:
    if "@" not in text:
        return
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        lm = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        if lm is None or m.group(1).rsplit(".", 1)[1].lower() in _FILE_EXT:
            continue
        if not m.group(1).isascii() and not all(c.isascii() or _letter(c) for c in m.group(1)):
            continue
        s = _local_start(text, lm.start(), at)
        # "git@github.com:org/repo" is an scp-style SSH remote, not a mailbox.
        scp = text.startswith(":", m.end()) and m.end() + 1 < len(text) and not text[m.end() + 1].isspace()
        if s is not None and s < at and text[at - 1] != "." and not scp:
            add("EMAIL", s, m.end())


# The user may be empty: `redis://:password@host` is how Redis and others take a password alone.
_URL_CRED = re.compile(r"://([^\s/?#@:\"'<>]{0,128}):([^\s/?#@\"'<>]{1,256})@(?=[A-Za-z0-9\[])")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{1,20}\Z")


def url_credentials(text: str, add: Add) -> None:
    if "://" not in text:
        return
    for m in _URL_CRED.finditer(text):
        # With no user, a password with a ':' is another syntax (CVS's "cvs://:pserver:anoncvs@").
        if m.group(1) == "" and ":" in m.group(2):
            continue
        if _SCHEME.search(text, max(0, m.start() - 21), m.start()) and not ck.is_placeholder(m.group(2)):
            add("URL_CREDENTIALS", m.start(1), m.end(2))


# --- IP addresses --------------------------------------------------------------------

_IPV4 = re.compile(r"(?:\d{1,3}\.){3}\d{1,3}" + _RN)
_IPV4_SEED = re.compile(r"\.\d{1,3}\.\d{1,3}\.")  # literal-led: '.' is cheap to jump between
_IPV4_HEAD = re.compile(r"\d{1,3}\Z")
# Dotted quads that are versions or document numbering, not addresses.
_VERSION_CTX = re.compile(
    r"(?:\bv|\bver\.?|version|versión|versao|versão|release|build|firmware|kernel|版本|oid|section|sección|"
    r"seção|secção|chapter|cap[ií]tulo|clause|cl[aá]usula|\bart\.?|art[ií]culo|artigo|item|step|paso|passo|§|"
    r"章|节|条|sections|identifier)\s*[:=#\"'(\[]{0,2}\s*$"
)
# Small dotted quads ("3.1.1.6", "7.1.4.34") are far more often versions than hosts; they
# count as addresses only next to a word about networking.
_IP_CTX = re.compile(
    r"\bip\b|\bips\b|\bip_|\bhost|server|\baddr\b|dns|gateway|proxy|firewall|\bping|\bssh|connect|\bpeer|"
    r"remote|servidor|地址|服务器"
)
_CIDR = re.compile(r"/(\d{1,3})(?!\d)")


def _ip_is_personal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.is_loopback or ip.is_unspecified:
        return False
    if ip.version == 4:  # netmasks such as 255.255.255.0 are configuration, not addresses
        bits = int(ip)
        inv = ~bits & 0xFFFFFFFF
        return not (bits >> 24 == 255 and inv & (inv + 1) == 0)
    return True


def _is_network(text: str, addr: str, end: int) -> bool:
    """`10.0.0.0/8`, `2001:db8::/32` name a range (host bits all zero), not a host."""
    c = _CIDR.match(text, end)
    if c is None:
        return False
    try:
        net = ipaddress.ip_network(f"{addr}/{c.group(1)}", strict=True)
    except ValueError:
        return False
    return net.prefixlen < net.max_prefixlen


def ipv4(text: str, add: Add) -> None:
    pos = 0
    for seed in _IPV4_SEED.finditer(text):
        head = _IPV4_HEAD.search(text, max(0, seed.start() - 3), seed.start())
        if head is None or head.start() < pos or not _left_ok(text, head.start(), ".-"):
            continue
        m = _IPV4.match(text, head.start())
        if m is None:
            continue
        pos = m.end()
        try:
            ip = ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        before = _before(text, m.start(), 20)
        if not _ip_is_personal(ip) or _VERSION_CTX.search(before) or _is_network(text, m.group(), m.end()):
            continue
        if ip.packed[0] < 10 and ip.packed[1] < 10 and not _IP_CTX.search(_before(text, m.start(), 40)):
            continue
        add("IPV4", *m.span())


# A seed is two colons of an address that `ipv6` can accept: one with a group of 3+ hex digits
# inside, before or after it, or three colons around a hex digit (4+ groups; ":::" is never an
# address). Cheaper seeds ("a:b:" in "a://a:b://...") would each cost a look back and a failed match.
_H = "[0-9A-Fa-f]"
_IPV6_SEED = re.compile(
    rf":(?:{_H}{{3,4}}:|(?<={_H}{{3}}:){_H}{{0,4}}:|{_H}{{0,4}}:{_H}{{3}}|(?:{_H}{{1,4}}:{_H}{{0,4}}|:{_H}{{1,4}}):)"
)
_IPV6_BACK = re.compile(r"[0-9A-Fa-f:]{0,40}\Z")
_IPV6 = re.compile(r"[0-9A-Fa-f:]{2,39}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?:%[0-9A-Za-z]{1,15})?")


def ipv6(text: str, add: Add) -> None:
    pos = 0
    for seed in _IPV6_SEED.finditer(text):
        if seed.start() < pos:
            continue
        back = _IPV6_BACK.search(text, max(0, seed.start() - 40), seed.start())
        s = back.start() if back else seed.start()
        if not _left_ok(text, s, ":."):
            continue
        m = _IPV6.match(text, s)
        if m is None:
            continue
        pos = m.end()
        if _word_at(text, pos):
            continue
        cand = m.group().split("%", 1)[0]
        groups = [g for g in re.split(r"[:.]", cand) if g]
        # "a::b" in C++ / Ruby is a scope operator; real addresses have a long group or many groups.
        if cand.count(":") < 2 or (max(map(len, groups), default=0) < 3 and len(groups) < 4):
            continue
        try:
            ip = ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        if _ip_is_personal(ip) and not _is_network(text, cand, m.end()):
            add("IPV6", *m.span())


# --- crypto addresses ----------------------------------------------------------------

# One pass per leading character: a literal first character lets `re` skip ahead fast.
_BTC_LEGACY = [re.compile(c + r"[1-9A-HJ-NP-Za-km-z]{25,34}" + _R) for c in "13"]
_BTC_BECH32 = [re.compile(p + r"(?<![0-9A-Za-z_]" + p + r")[0-9A-Za-z]{8,87}" + _R) for p in ("bc1", "BC1")]
_ETH = re.compile(r"0x(?<![0-9A-Za-z_]0x)([0-9a-fA-F]{40})" + _R)


def crypto_addresses(text: str, add: Add) -> None:
    for pat in _BTC_LEGACY:
        for m in pat.finditer(text):
            if _left_ok(text, m.start()) and ck.base58check_ok(m.group()):
                add("BITCOIN_ADDRESS", *m.span())
    for pat in _BTC_BECH32:
        for m in pat.finditer(text):
            if ck.bech32_ok(m.group()):
                add("BITCOIN_ADDRESS", *m.span())
    for m in _ETH.finditer(text):
        if ck.eip55_ok(m.group(1)):
            add("ETHEREUM_ADDRESS", *m.span())
