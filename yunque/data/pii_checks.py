"""Checksum and structure validators behind the PII detectors in `yunque.data.pii`.

Each function takes the candidate already stripped of separators and answers whether
it is a well-formed identifier of its kind. They run only on regex candidates (rare in
prose), so they favour clarity over speed. Never log or return the values themselves.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import math
import re
from collections import Counter

# --- generic ---------------------------------------------------------------------


def shannon_entropy(s: str) -> float:
    """Bits per character of `s` under its own character distribution."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


_LUHN_DOUBLE = str.maketrans("0123456789", "0246813579")  # 2d, minus 9 when that is > 9


def luhn_ok(digits: str) -> bool:
    doubled = digits[-2::-2].translate(_LUHN_DOUBLE)
    return (sum(map(int, digits[-1::-2])) + sum(map(int, doubled))) % 10 == 0


def _valid_date(yy: int, mm: int, dd: int) -> bool:
    # Two-digit years: either century is fine, we only need a real calendar day.
    for century in (1900, 2000):
        try:
            datetime.date(century + yy, mm, dd)
            return True
        except ValueError:
            continue
    return False


# Documentation stand-ins: "<your key>", "${VAR}", "xxxx", "changeme", "password".
_PLACEHOLDER = re.compile(
    r"^[*xX.\-_#•]+$|<[^>]*>|\$\{|\{\{|%\(|%s\b|\*\*\*|xxxx|\.\.\.|^\$[A-Za-z_]"
    r"|\{\}|your[_\- ]|changeme|redacted|placeholder|example\.(?:com|org)"
    r"|^(?:pass(?:word|wd)?|pwd|secret|token|key|user|username|hidden|dummy|test|foo|bar)$",
    re.IGNORECASE,
)


def is_placeholder(value: str) -> bool:
    return _PLACEHOLDER.search(value) is not None


# --- payment ---------------------------------------------------------------------

# (prefix range low, high, allowed lengths): Visa, Mastercard, Amex, Discover, JCB,
# Diners, UnionPay, Maestro. Unknown issuers are rejected: a Luhn pass alone is 1 in 10.
_IIN_RANGES: tuple[tuple[int, int, tuple[int, ...]], ...] = (
    (4, 4, (13, 16, 19)),
    (51, 55, (16,)),
    (2221, 2720, (16,)),
    (34, 34, (15,)),
    (37, 37, (15,)),
    (6011, 6011, (16, 17, 18, 19)),
    (644, 649, (16, 17, 18, 19)),
    (65, 65, (16, 17, 18, 19)),
    (3528, 3589, (16, 17, 18, 19)),
    (300, 305, (14, 15, 16, 17, 18, 19)),
    (36, 36, (14, 15, 16, 17, 18, 19)),
    (38, 39, (14, 15, 16, 17, 18, 19)),
    (62, 62, (16, 17, 18, 19)),
    (50, 50, (12, 13, 14, 15, 16, 17, 18, 19)),
    (56, 58, (12, 13, 14, 15, 16, 17, 18, 19)),
    (67, 67, (12, 13, 14, 15, 16, 17, 18, 19)),
)


# The same ranges on the first four digits, so a candidate costs one int() and a few compares.
_IIN4 = tuple((lo * 10 ** (4 - len(str(lo))), (hi + 1) * 10 ** (4 - len(str(hi))) - 1, n) for lo, hi, n in _IIN_RANGES)


def card_ok(digits: str) -> bool:
    if not 12 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    n, head = len(digits), int(digits[:4])
    for lo, hi, lengths in _IIN4:
        if lo <= head <= hi and n in lengths:
            return luhn_ok(digits)
    return False


# ISO 13616 registry lengths.
# fmt: off
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
# fmt: on


def iban_ok(compact: str) -> bool:
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    try:
        return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1
    except ValueError:
        return False


# --- national identifiers -----------------------------------------------------------


def ssn_ok(area: str, group: str, serial: str) -> bool:
    a = int(area)
    return a != 0 and a != 666 and a < 900 and group != "00" and serial != "0000"


_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def dni_ok(digits: str, letter: str) -> bool:
    return len(digits) == 8 and _DNI_LETTERS[int(digits) % 23] == letter


def nie_ok(prefix: str, digits: str, letter: str) -> bool:
    return len(digits) == 7 and _DNI_LETTERS[int(str("XYZ".index(prefix)) + digits) % 23] == letter


_CURP_ALPHABET = "0123456789ABCDEFGHIJKLMNÑOPQRSTUVWXYZ"
CURP_STATES = frozenset(
    "AS BC BS CC CL CM CS CH DF DG GT GR HG JC MC MN MS NT NL OC PL QT QR SP SL SR TC TS TL VZ YN ZS NE".split()
)


def curp_ok(curp: str) -> bool:
    if len(curp) != 18 or curp[11:13] not in CURP_STATES:
        return False
    if not _valid_date(int(curp[4:6]), int(curp[6:8]), int(curp[8:10])):
        return False
    total = sum(_CURP_ALPHABET.index(c) * (18 - i) for i, c in enumerate(curp[:17]))
    return curp[17] == str((10 - total % 10) % 10)


def rfc_ok(rfc: str) -> bool:
    """Structure plus a real birth/incorporation date; the SAT check digit is not
    required because a noticeable share of issued RFCs do not satisfy it."""
    letters = len(rfc) - 9
    d = rfc[letters : letters + 6]
    return letters in (3, 4) and d.isdigit() and _valid_date(int(d[:2]), int(d[2:4]), int(d[4:6]))


def _mod11_check(digits: str, weights: tuple[int, ...]) -> int:
    return sum(int(c) * w for c, w in zip(digits, weights)) % 11


def cpf_ok(digits: str) -> bool:
    if len(digits) != 11 or len(set(digits)) == 1:
        return False
    for n in (9, 10):
        r = sum(int(digits[i]) * (n + 1 - i) for i in range(n)) * 10 % 11 % 10
        if r != int(digits[n]):
            return False
    return True


def cuit_ok(digits: str) -> bool:
    if len(digits) != 11 or digits[:2] not in {"20", "23", "24", "27", "30", "33", "34"}:
        return False
    r = _mod11_check(digits[:10], (5, 4, 3, 2, 7, 6, 5, 4, 3, 2))
    return "012345678990"[11 - r] == digits[10]


def rut_ok(body: str, dv: str) -> bool:
    if not 7 <= len(body) <= 8:
        return False
    total = sum(int(c) * (2 + i % 6) for i, c in enumerate(reversed(body)))
    r = 11 - total % 11
    return dv.upper() == {11: "0", 10: "K"}.get(r, str(r))


def nino_ok(prefix: str, suffix: str) -> bool:
    """UK National Insurance number: HMRC's allocation rules for the two prefix letters (no check
    digit exists). "QQ" prefixes are HMRC's own examples and never issued."""
    return (
        prefix[0] not in "DFIQUV"
        and prefix[1] not in "DFIOQUV"
        and prefix not in ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ")
        and suffix in "ABCD"
    )


# Codice fiscale: characters in odd positions (1st, 3rd, ...) and even ones weigh differently.
_CF_ODD = [1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23]
_CF_MONTHS = "ABCDEHLMPRST"
_CF_OMOCODE = "LMNPQRSTUV"  # letters standing for 0-9 where two people would share a code
_CF_DIGIT_POS = (6, 7, 9, 10, 12, 13, 14)


def _cf_value(c: str) -> int:
    return ord(c) - 48 if c.isdigit() else ord(c) - 65


def codice_fiscale_ok(cf: str) -> bool:
    """Italian fiscal code: 16 characters, a real month letter and day, and the check letter."""
    if len(cf) != 16 or not cf.isascii():
        return False
    plain = list(cf)
    for i in _CF_DIGIT_POS:
        if plain[i] in _CF_OMOCODE:
            plain[i] = str(_CF_OMOCODE.index(plain[i]))
        elif not plain[i].isdigit():
            return False
    day = int(plain[9] + plain[10])
    if cf[8] not in _CF_MONTHS or not (1 <= day <= 31 or 41 <= day <= 71):
        return False
    total = sum(_CF_ODD[_cf_value(c)] if i % 2 == 0 else _cf_value(c) for i, c in enumerate(cf[:15]))
    return cf[15] == chr(65 + total % 26)


def sin_ok(digits: str) -> bool:
    """Canadian Social Insurance Number: 9 digits, Luhn; 8 starts business numbers, not SINs."""
    return len(digits) == 9 and digits[0] != "8" and len(set(digits)) > 1 and luhn_ok(digits)


_CN_WEIGHTS = [2 ** (17 - i) % 11 for i in range(17)]
# First two digits: a province-level division (GB/T 2260).
_CN_PROVINCES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 61 62 63 64 65 71 81 82".split()
)


def cn_resident_id_ok(id18: str) -> bool:
    """Chinese resident identity card number (GB 11643): province, real birth date, ISO 7064 MOD 11-2."""
    if len(id18) != 18 or not id18[:17].isdigit() or id18[:2] not in _CN_PROVINCES:
        return False
    try:
        born = datetime.date(int(id18[6:10]), int(id18[10:12]), int(id18[12:14]))
    except ValueError:
        return False
    if not datetime.date(1900, 1, 1) <= born <= datetime.date.today():
        return False
    total = sum(int(c) * w for c, w in zip(id18[:17], _CN_WEIGHTS, strict=True))
    return id18[17].upper() == "10X98765432"[total % 11]


def nir_ok(nir: str) -> bool:
    """French social security number (NIR, 15 characters without spaces): sex digit, a possible
    month, and the key 97 - (number mod 97); Corsica's 2A / 2B count as 19 / 18 in the key."""
    if len(nir) != 15 or nir[0] not in "123478":
        return False
    month = int(nir[3:5])
    if not (1 <= month <= 12 or month == 20 or 30 <= month <= 42 or month >= 50):
        return False
    body = nir[:5] + {"2A": "19", "2B": "18"}.get(nir[5:7], nir[5:7]) + nir[7:13]
    if not body.isdigit() or not nir[13:].isdigit():
        return False
    return 97 - int(body) % 97 == int(nir[13:])


# --- crypto addresses ---------------------------------------------------------------

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def base58check_ok(addr: str) -> bool:
    """Legacy P2PKH ('1…', version 0) or P2SH ('3…', version 5) mainnet address."""
    import hashlib

    n = 0
    for c in addr:
        n = n * 58 + _B58_INDEX[c]
    pad = len(addr) - len(addr.lstrip("1"))
    raw = b"\x00" * pad + n.to_bytes((n.bit_length() + 7) // 8, "big")
    if len(raw) != 25 or raw[0] not in (0, 5):
        return False
    return hashlib.sha256(hashlib.sha256(raw[:-4]).digest()).digest()[:4] == raw[-4:]


_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _bech32_polymod(values: list[int]) -> int:
    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    return chk


def bech32_ok(addr: str) -> bool:
    """Segwit mainnet address (BIP-173 bech32 for v0, BIP-350 bech32m for v1+)."""
    if addr.lower() != addr and addr.upper() != addr:
        return False
    addr = addr.lower()
    hrp, _, data = addr.rpartition("1")
    if hrp != "bc" or len(data) < 7 or any(c not in _BECH32 for c in data):
        return False
    vals = [_BECH32.index(c) for c in data]
    const = _bech32_polymod([ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + vals)
    version = vals[0]
    if const != (1 if version == 0 else 0x2BC830A3) or version > 16:
        return False
    nbits = (len(vals) - 7) * 5  # program bits after dropping version and 6 checksum chars
    plen = nbits // 8
    return (version == 0 and plen in (20, 32)) or (version > 0 and 2 <= plen <= 40)


# fmt: off
_KECCAK_RC = [
    0x0000000000000001, 0x0000000000008082, 0x800000000000808A, 0x8000000080008000,
    0x000000000000808B, 0x0000000080000001, 0x8000000080008081, 0x8000000000008009,
    0x000000000000008A, 0x0000000000000088, 0x0000000080008009, 0x000000008000000A,
    0x000000008000808B, 0x800000000000008B, 0x8000000000008089, 0x8000000000008003,
    0x8000000000008002, 0x8000000000000080, 0x000000000000800A, 0x800000008000000A,
    0x8000000080008081, 0x8000000000008080, 0x0000000080000001, 0x8000000080008008,
]
_KECCAK_ROT = [0, 1, 62, 28, 27, 36, 44, 6, 55, 20, 3, 10, 43, 25, 39, 41, 45, 15, 21, 8, 18, 2, 61, 56, 14]
# fmt: on
_M64 = (1 << 64) - 1


def _keccak_f(a: list[int]) -> None:
    for rc in _KECCAK_RC:
        c = [a[x] ^ a[x + 5] ^ a[x + 10] ^ a[x + 15] ^ a[x + 20] for x in range(5)]
        d = [c[x - 1] ^ ((c[(x + 1) % 5] << 1 | c[(x + 1) % 5] >> 63) & _M64) for x in range(5)]
        a[:] = [a[i] ^ d[i % 5] for i in range(25)]
        b = [0] * 25
        for x in range(5):
            for y in range(5):
                r = _KECCAK_ROT[x + 5 * y]
                v = a[x + 5 * y]
                b[y + 5 * ((2 * x + 3 * y) % 5)] = (v << r | v >> (64 - r)) & _M64 if r else v
        a[:] = [b[i] ^ (~b[(i % 5 + 1) % 5 + 5 * (i // 5)] & b[(i % 5 + 2) % 5 + 5 * (i // 5)]) for i in range(25)]
        a[0] ^= rc


def keccak256(data: bytes) -> bytes:
    """Original Keccak-256 (Ethereum's hash; differs from hashlib.sha3_256 in padding)."""
    rate = 136
    msg = bytearray(data) + b"\x01" + b"\x00" * ((-len(data) - 1) % rate)
    msg[-1] |= 0x80
    state = [0] * 25
    for off in range(0, len(msg), rate):
        for i in range(rate // 8):
            state[i] ^= int.from_bytes(msg[off + 8 * i : off + 8 * i + 8], "little")
        _keccak_f(state)
    return b"".join(state[i].to_bytes(8, "little") for i in range(4))


def eip55_ok(hex40: str) -> bool:
    """All-lower / all-upper addresses carry no checksum; mixed case must match EIP-55."""
    if hex40.lower() == hex40 or hex40.upper() == hex40:
        return True
    h = keccak256(hex40.lower().encode()).hex()
    return all((c.upper() if int(h[i], 16) >= 8 else c.lower()) == c for i, c in enumerate(hex40))


# --- tokens ------------------------------------------------------------------------


_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def base64_bytes(s: str) -> int:
    """How many bytes standard base64 `s` decodes to (padding optional), or -1 if it is not base64."""
    if not _B64.fullmatch(s) or len(s.rstrip("=")) % 4 == 1:
        return -1
    core = s.rstrip("=")
    return len(core) * 3 // 4


def jwt_header_ok(part: str) -> bool:
    try:
        header = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and "alg" in header
