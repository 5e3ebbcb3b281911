"""Digit-heavy detectors: phones, cards, IBANs and national identifiers.

All of them contain a run of >= 6 digits (separators, or single capital letters as in the
codice fiscale's "85T10A562" and the NIR's "12 2A 451", allowed), so one cheap digit-led
regex finds seed runs, and
the ~30 specific patterns only run in small windows around them. Typical prose has few
such runs; a document without any costs one regex pass.

Identifiers without a check digit (UK NINO; SSN, CPF, CUIT, NIR written without their
usual grouping) or whose check is weak for their shape (a Luhn-valid 9-digit SIN is one
number in ten) need their name shortly before them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from yunque.data import pii_checks as ck

Add = Callable[[str, int, int], None]
NUMERIC_TYPES = ("PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "ES_DNI", "ES_NIE", "MX_CURP", "MX_RFC",
                 "BR_CPF", "AR_CUIT", "CL_RUT", "UK_NINO", "IT_FISCAL_CODE", "CA_SIN", "CN_RESIDENT_ID",
                 "FR_NIR")  # fmt: skip

_L = r"(?<![0-9A-Za-z_])"
_R = r"(?![0-9A-Za-z_])"
_LN = r"(?<![0-9A-Za-z_.\-])"
_RN = r"(?![0-9A-Za-z_]|[.\-/]\d)"
_SEP = r"[ .\-\u00a0]"

# The lookbehind makes attempts start only at a run's first digit, the possessive repeat
# keeps no backtracking state: together they pay for the capital-letter joins.
_SEED = re.compile(r"\d(?<!\d\d)(?:[ .\-/()\u00a0]{0,2}\d|[A-Z] ?\d){5,}+")
_NOT_DIGIT = re.compile(r"\D")
_TAIL = re.compile(r"[0-9A-Za-z_]{0,64}")
_MARGIN = 24  # longest non-digit stretch at either end of a match (IBAN "GB82 WEST ", CURP tail)

_CARD_SEP = re.compile(r"[ \-]")
_CARD = re.compile(_LN + r"\d(?:[ \-]?\d){11,18}" + _RN)
# Any case: "es91 2100 0418 4502 0005 1332" is as much an account number (validated upper-cased).
_IBAN = re.compile(_L + r"[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,4})?" + _R)
_SSN = re.compile(_LN + r"(\d{3})-(\d{2})-(\d{4})" + _RN)
_SSN_CTX = re.compile(r"ssn|social security|seguro social")
_SSN_BARE = re.compile(_LN + r"(\d{3}) ?(\d{2}) ?(\d{4})" + _RN)
_EXP_R = r"(?![0-9A-Za-z_]|[+\-]\d)"  # "1.38435736E+12" is a float, not an ID with a letter
_DNI = re.compile(_LN + r"(\d{8})[ \-]?([A-Z])" + _EXP_R)
_NIE = re.compile(_L + r"([XYZ])[ \-]?(\d{7})[ \-]?([A-Z])" + _R)
_CURP = re.compile(_L + r"[A-Z][AEIOUX][A-Z]{2}\d{6}[HMX][A-Z]{5}[0-9A-Z]\d" + _R)
_RFC = re.compile(r"(?<![0-9A-Za-z_&Ñ])[A-ZÑ&]{3,4}\d{6}[A-Z0-9]{2}[0-9A]" + _R)
_CPF = re.compile(_LN + r"\d{3}\.\d{3}\.\d{3}-\d{2}" + _RN)
_CUIT = re.compile(_LN + r"(?:20|23|24|27|30|33|34)-\d{8}-\d" + _RN)
_ELEVEN = re.compile(_LN + r"\d{11}" + _RN)
_RUT = re.compile(_LN + r"(\d{1,2}(?:\.\d{3}){2}|\d{7,8})-([\dkK])" + _R)
_NINO = re.compile(_L + r"([A-Z]{2})( ?)(\d{2})\2(\d{2})\2(\d{2})\2([A-D])" + _R)
# Names searched in the lower-cased text before a candidate: alternations that each start with a
# literal, which `re` scans fast (a leading \b or (?i) makes it try every position: 5x slower).


def _word(w: str) -> str:
    """`w` as a whole word, its boundaries checked after the literal."""
    return re.escape(w) + f"(?<![a-z0-9_]{re.escape(w)})(?![a-z0-9_])"


_NINO_CTX = re.compile("|".join(["nino", "national insurance", _word("ni"), _word("n.i."), "insurance n"]))
_CF = re.compile(_L + r"[A-Z]{6}[0-9L-NP-V]{2}[ABCDEHLMPRST][0-9L-NP-V]{2}[A-Z][0-9L-NP-V]{3}[A-Z]" + _R)
_SIN = re.compile(_LN + r"(\d{3})([ \-]?)(\d{3})\2(\d{3})" + _RN)
_SIN_CTX = re.compile("|".join([_word("sin"), _word("s.i.n."), _word("nas"), "social insurance", "assurance sociale"]))
# "sin" is Spanish for "without": the acronyms count in capitals only.
_SIN_UPPER = re.compile(r"(?<![A-Za-z])(?:SIN|NAS|S\.I\.N\.)(?![A-Za-z])")
_CN_ID = re.compile(_LN + r"[1-8]\d{16}[\dXx]" + _R)
# Written grouped ("1 84 12 76 451 089 46") or as one run, which then needs its name before it.
_NIR = re.compile(_LN + r"[1-478]( ?)\d{2}\1\d{2}\1(?:\d{2}|2[AB])\1\d{3}\1\d{3}\1\d{2}" + _RN)
_NIR_CTX = re.compile(
    "|".join(
        [
            _word("nir"),
            "s[ée]curit[ée] sociale",
            _word("secu"),
            _word("sécu"),
            "insee",
            "social security",
            "carte vitale",
            "n° ss",
            "assur[ée]e? social",
        ]
    )  # fmt: skip
)

# In the phone patterns "~" stands for one separator: space, dot, dash or no-break space.
# International prefix: "+34", "(+34)" or "0034" (the 00 form only with separators, see below).
# The digit groups are possessive: a digit run splits one way only (a match can only end at
# the end of a run anyway), instead of 5^6 ways tried at every "+" before a long run.
_PHONE_INTL = re.compile(
    (
        r"(?<![0-9A-Za-z_+(])(?:\+\d{1,3}|\(\+\d{1,3}\)|00[1-9]\d{0,2}(?=~))(?:~?\(\d{1,4}\))?(?:~?\d{1,5}+){1,6}" + _RN
    ).replace("~", _SEP)
)
_PHONE_NATIONAL = [
    re.compile((p + _RN).replace("~", _SEP))
    for p in (
        # NANP: (415) 555-0132, 415-555-0132, 1 415 555 0132
        r"(?<![0-9A-Za-z_+\-.])(?:1~)?(?:\([2-9]\d{2}\)~?|[2-9]\d{2}~)[2-9]\d{2}~\d{4}",
        # Spain: 612 345 678, 612 34 56 78, 91 123 45 67
        _LN + r"(?:[6789]\d{2}(?:~\d{3}){2}|[6789]\d{2}(?:~\d{2}){3}|[89]\d~\d{3}(?:~\d{2}){2})",
        # Area code in parentheses: (55) 1234-5678, (11) 91234-5678, (011) 4123-4567
        _L + r"\(0?\d{2,4}\)~?\d{3,5}~?\d{4}",
        # Area code + local: 55 1234 5678, 11 91234-5678, 011 4123-4567, 0341 421-1234, 010-1234-5678
        _LN + r"(?:0?\d{2}|0\d{3})~(?:\d{4,5}|\d{3})~\d{4}",
        # Pairs after a trunk 0 (France, Belgium, Morocco...): 06 12 34 56 78
        _LN + r"0\d(?:~\d{2}){4}",
        # China: 138 0013 8000, 138-0013-8000, 010-12345678 (bare 13800138000: see _CN_BARE)
        _LN + r"1[3-9]\d(?:[ \-]\d{4}){2}",
        _LN + r"0\d{2,3}-\d{7,8}",
    )
]
_SIGNED_DECIMAL = re.compile(r"\+\d+\.\d+")
_CN_BARE = re.compile(_LN + r"1[3-9]\d{9}" + _RN)
_PHONE_BARE = re.compile(_LN + r"\d{9,12}" + _RN)
_PHONE_CTX = re.compile(
    r"tel\b|tel[eé]fono|telefone|phone|mobile|cell|fax|whats ?app|call|m[oó]vil|celular|fone|contact|"
    r"contato|contacto|hotline|customer service|atendimento|atenci[oó]n al cliente|llam|ligue|ligar|"
    r"\b(?:my|mi|meu|our|nuestro|nosso) n[uú]mero|\bmy number|电话|手机|联系|致电|拨打|热线|客服|号码"
)
_ID_CTX = re.compile(
    r"order|invoice|\bref|ticket|tracking|isbn|issn|serial|sku|account|acct|\bid\b|\bno\.|n[º°]|#|pedido|"
    r"factura|folio|protocolo|rastreo|rastreamento|nota fiscal|订单|编号|单号|运单|发票|账号|序列"
)
# Amounts and counts: a currency or unit right before/after, or decimals after (",90").
_AMOUNT_AFTER = re.compile(
    r",\d|\s?(?:€|\$|%|eur\b|usd\b|euros?\b|d[oó]lares|pesos|reais|yen|yuan|km|kg|habitantes|people|personas|"
    r"pessoas|units|unidades|bytes|[kmg]b\b|元|人)",
    re.IGNORECASE,
)
_AMOUNT_BEFORE = re.compile(r"(?:\$|€|£|¥|\b(?:eur|usd|mxn|brl|ars|clp|gbp|cny|rmb|jpy))\s?$")
_YEAR = re.compile(r"(?:19|20)\d\d")
# ITU-T E.164 country codes (1-, 2- and 3-digit); a "+" number must start with one.
_CC = frozenset(
    "1 7 20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 60 61 62 63 64 65 66 "
    "81 82 84 86 90 91 92 93 94 95 98 211 212 213 216 218 220 221 222 223 224 225 226 227 228 229 230 231 232 "
    "233 234 235 236 237 238 239 240 241 242 243 244 245 246 248 249 250 251 252 253 254 255 256 257 258 260 "
    "261 262 263 264 265 266 267 268 269 290 291 297 298 299 350 351 352 353 354 355 356 357 358 359 370 371 "
    "372 373 374 375 376 377 378 380 381 382 383 385 386 387 389 420 421 423 500 501 502 503 504 505 506 507 "
    "508 509 590 591 592 593 594 595 596 597 598 599 670 672 673 674 675 676 677 678 679 680 681 682 683 685 "
    "686 687 688 689 690 691 692 850 852 853 855 856 880 886 960 961 962 963 964 965 966 967 968 970 971 972 "
    "973 974 975 976 977 992 993 994 995 996 998".split()
)


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def _ctx(text: str, start: int, width: int = 24) -> str:
    return text[max(0, start - width) : start].lower()


def _windows(text: str) -> list[tuple[int, int, int]]:
    """Merged (start, end, most digits in one seed run) windows around runs of >= 6 digits."""
    out: list[tuple[int, int, int]] = []
    n = len(text)
    for m in _SEED.finditer(text):
        nd = len(_NOT_DIGIT.sub("", m.group()))
        s, e = max(0, m.start() - _MARGIN), min(n, m.end() + _MARGIN)
        e = _TAIL.match(text, e).end()
        if out and s <= out[-1][1]:  # (widening s below could only make it merge more)
            out[-1] = (out[-1][0], e, max(nd, out[-1][2]))
            continue
        # Never cut a token in two (a truncated token would pass the boundary checks):
        # widen to the surrounding whitespace.
        s = max(text.rfind(" ", max(0, s - 64), s), text.rfind("\n", max(0, s - 64), s), s - 64, 0)
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], e, max(nd, out[-1][2]))
        else:
            out.append((s, e, nd))
    return out


def _sin_named(text: str, start: int) -> bool:
    m = _SIN_CTX.search(_ctx(text, start, 32))
    if m is None:
        return False
    if m.group() in ("sin", "nas", "s.i.n."):
        return _SIN_UPPER.search(text, max(0, start - 32), start) is not None
    return True


def _cards(text: str, s: int, e: int, add: Add) -> None:
    for m in _CARD.finditer(text, s, e):
        if _RUN_BEFORE.match(text, m.start() - 2, m.start()):  # the middle of a table or a longer number
            continue
        raw = m.group()
        groups = _CARD_SEP.split(raw)
        if len(groups) > 1 and ((" " in raw and "-" in raw) or len(groups[0]) != 4 or min(map(len, groups[:-1])) < 4):
            continue
        # "4111 1111 1111 1111 2024": try the longest run of whole groups that validates.
        for k in range(len(groups), 0, -1):
            digits = "".join(groups[:k])
            if len(digits) < 12:
                break
            if len(digits) <= 19 and ck.card_ok(digits):
                add("CREDIT_CARD", m.start(), m.start() + len(" ".join(groups[:k])))
                break


def _ibans(text: str, s: int, e: int, add: Add) -> None:
    for m in _IBAN.finditer(text, s, e):
        want = ck.IBAN_LENGTHS.get(m.group()[:2].upper())
        if want is None:
            continue
        # A following all-caps word can be swallowed by the grouping: cut at the country length.
        count, end = 0, m.start()
        for end, c in enumerate(m.group(), m.start()):  # noqa: B007
            count += c != " "
            if count == want:
                break
        end += 1
        if (
            count == want
            and (end == m.end() or text[end] == " ")
            and ck.iban_ok(m.group()[: end - m.start()].replace(" ", "").upper())
        ):
            add("IBAN", m.start(), end)


def _upper_ids(text: str, s: int, e: int, add: Add) -> None:
    for m in _DNI.finditer(text, s, e):
        if ck.dni_ok(*m.groups()):
            add("ES_DNI", *m.span())
    for m in _NIE.finditer(text, s, e):
        if ck.nie_ok(*m.groups()):
            add("ES_NIE", *m.span())
    for m in _CURP.finditer(text, s, e):
        if ck.curp_ok(m.group()):
            add("MX_CURP", *m.span())
    for m in _RFC.finditer(text, s, e):
        if ck.rfc_ok(m.group()):
            add("MX_RFC", *m.span())
    for m in _NINO.finditer(text, s, e):
        if ck.nino_ok(m.group(1), m.group(6)) and (m.group(2) or _NINO_CTX.search(_ctx(text, m.start(), 40))):
            add("UK_NINO", *m.span())
    for m in _CF.finditer(text, s, e):
        if ck.codice_fiscale_ok(m.group()):
            add("IT_FISCAL_CODE", *m.span())


def _long_ids(text: str, s: int, e: int, add: Add) -> None:
    """Identifiers of >= 9 digits: SSN, CPF, CUIT."""
    for m in _SSN.finditer(text, s, e):
        if ck.ssn_ok(*m.groups()):
            add("US_SSN", *m.span())
    for m in _SSN_BARE.finditer(text, s, e):
        if "-" not in m.group() and _SSN_CTX.search(_ctx(text, m.start())) and ck.ssn_ok(*m.groups()):
            add("US_SSN", *m.span())
    for m in _CPF.finditer(text, s, e):
        if ck.cpf_ok(_digits(m.group())):
            add("BR_CPF", *m.span())
    for m in _CUIT.finditer(text, s, e):
        if ck.cuit_ok(_digits(m.group())):
            add("AR_CUIT", *m.span())
    for m in _ELEVEN.finditer(text, s, e):  # unformatted: only right after the document's name
        ctx, d = _ctx(text, m.start(), 16), m.group()
        if "cpf" in ctx and ck.cpf_ok(d):
            add("BR_CPF", *m.span())
        elif ("cuit" in ctx or "cuil" in ctx) and ck.cuit_ok(d):
            add("AR_CUIT", *m.span())


def _more_ids(text: str, s: int, e: int, add: Add) -> None:
    """Identifiers of >= 9 digits: SIN, Chinese resident ID, NIR."""
    for m in _SIN.finditer(text, s, e):
        if _sin_named(text, m.start()) and ck.sin_ok(_digits(m.group())):
            add("CA_SIN", *m.span())
    for m in _CN_ID.finditer(text, s, e):
        if ck.cn_resident_id_ok(m.group()):
            add("CN_RESIDENT_ID", *m.span())
    for m in _NIR.finditer(text, s, e):
        if (m.group(1) or _NIR_CTX.search(_ctx(text, m.start(), 40))) and ck.nir_ok(m.group().replace(" ", "")):
            add("FR_NIR", *m.span())


def _ruts(text: str, s: int, e: int, add: Add) -> None:
    for m in _RUT.finditer(text, s, e):
        if ck.rut_ok(m.group(1).replace(".", ""), m.group(2)):
            add("CL_RUT", *m.span())


def _intl_phones(text: str, s: int, e: int, add: Add) -> None:
    for m in _PHONE_INTL.finditer(text, s, e):
        raw = m.group()
        d = _digits(raw)
        if raw.startswith("00"):
            if _in_number_run(text, m.start(), m.end()):  # "4792 0096 6386 8791" is one number
                continue
            d = d[2:]
        has_sep = any(not c.isdigit() for c in raw.lstrip("(+")[1:])
        if _SIGNED_DECIMAL.fullmatch(m.group()):  # "+35236450.6"
            continue
        if d[:1] in "17" and len(d) != 11:  # NANP (+1) and +7 numbers have exactly 10 national digits
            continue
        if 8 <= len(d) <= 15 and (has_sep or len(d) >= 10) and (d[:1] in _CC or d[:2] in _CC or d[:3] in _CC):
            add("PHONE", *m.span())


def _national_phones(text: str, s: int, e: int, add: Add) -> None:
    for pat in _PHONE_NATIONAL:
        for m in pat.finditer(text, s, e):
            if _national_phone_ok(text, m.start(), m.end()):
                add("PHONE", *m.span())
    # An unformatted Chinese mobile number is just 11 digits: accept it in Chinese text (a CJK
    # character right before) or after a phone word, not as a bare integer in code or tables.
    for m in _CN_BARE.finditer(text, s, e):
        before = text[max(0, m.start() - 8) : m.start()]
        cjk = any("\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef" for c in before)
        if (cjk or _phone_words_near(text, m.start(), m.end())) and _national_phone_ok(text, m.start(), m.end()):
            add("PHONE", *m.span())
    for m in _PHONE_BARE.finditer(text, s, e):
        if _phone_words_near(text, m.start(), m.end()) and _national_phone_ok(text, m.start(), m.end()):
            add("PHONE", *m.span())


def _phone_words_near(text: str, start: int, end: int) -> bool:
    """A phone word shortly before ("Tel: …") or after ("… por WhatsApp") the number."""
    return bool(_PHONE_CTX.search(_ctx(text, start)) or _PHONE_CTX.search(text[end : end + 24].lower()))


_RUN_BEFORE = re.compile(r"\d[ .\-]")
_RUN_AFTER = re.compile(r"[ .\-]\d")


def _in_number_run(text: str, start: int, end: int) -> bool:
    return bool((start >= 2 and _RUN_BEFORE.match(text, start - 2, start)) or _RUN_AFTER.match(text, end))


def _national_phone_ok(text: str, start: int, end: int) -> bool:
    if _in_number_run(text, start, end):
        return False  # scores, tables, long reference numbers: not a dialable number
    raw = text[start:end]
    groups = re.findall(r"\d+", raw)
    d = "".join(groups)
    if not 9 <= len(d) <= 12 or d.startswith("00") or len(set(d)) < 3 or set(d[len(groups[0]) :]) == {"0"}:
        return False
    before = _ctx(text, start)
    if (
        sum(bool(_YEAR.fullmatch(g)) for g in groups) >= 2
        or _AMOUNT_AFTER.match(text, end)
        or _AMOUNT_BEFORE.search(before)
    ):
        return False  # "2019 2020 2021", "700 000 000 €", "R$ 712.345.678"
    return not _ID_CTX.search(before) or bool(_PHONE_CTX.search(before))


_UPPER_NEAR_DIGIT = re.compile(r"[A-Z][ \-]?\d|\d[ \-]?[A-Z]")
# One search for both gates: a capital next to a digit (IDs with letters, IBANs) or, failing
# that, the start of a lower-case IBAN.
_LETTER = re.compile(r"[A-Za-z]")
_GATE = re.compile(r"[A-Z][ \-]?\d|\d[ \-]?[A-Z]|\d(?<=[a-z]{2}\d)\d")  # no group: that would cost the fast scan


def numeric_ids(text: str, add: Add) -> None:
    # Gate each family on what its shortest member needs, so the many date/amount windows
    # of ordinary prose cost one or two checks instead of twenty regex runs.
    for s, e, nd in _windows(text):
        dash = text.find("-", s, e) >= 0
        # (a digit dump is one huge window: see first whether it has a letter at all)
        g = _GATE.search(text, s, e) if e - s < 2000 or _LETTER.search(text, s, e) else None
        if g is not None:
            if not g.group().isdigit() or _UPPER_NEAR_DIGIT.search(text, g.start() + 1, e):
                _upper_ids(text, s, e, add)
            _ibans(text, s, e, add)
        if nd >= 12:
            _cards(text, s, e, add)
        if nd >= 9:
            _long_ids(text, s, e, add)
            _more_ids(text, s, e, add)
            _national_phones(text, s, e, add)
        if nd >= 7 and dash:
            _ruts(text, s, e, add)
        if nd >= 6 and (text.find("+", s, e) >= 0 or text.find("00", s, e) >= 0):
            _intl_phones(text, s, e, add)
