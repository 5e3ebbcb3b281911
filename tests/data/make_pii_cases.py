"""Generate tests/data/pii_cases.jsonl: the labelled PII set (deterministic, synthetic only).

Identifiers are generated here with their own check-digit code (independent of the
detector's validators), from reserved or fictional ranges where they exist (example.com,
TEST-NET IPs, 2001:db8::/32, 555-01xx, AWS's documented example key). Contexts and hard
negatives are hand-written in English, Spanish, Portuguese and Chinese.

    python tests/data/make_pii_cases.py [OUT]   # default: rewrites pii_cases.jsonl next to this file
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from yunque.data.pii_checks import keccak256  # noqa: E402 (checked against EIP-55 vectors in tests)

R = random.Random(20261123)
UP, LO, DIG = string.ascii_uppercase, string.ascii_lowercase, string.digits
ALNUM = UP + LO + DIG


def rs(alphabet: str, n: int) -> str:
    return "".join(R.choice(alphabet) for _ in range(n))


def luhn_digit(payload: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


# --- generators: each returns (text, (span_start, span_end)) or just text (whole = span) ---


def email() -> str:
    first = R.choice(["ana", "john", "maria", "li.wei", "joao", "carlos", "emily", "zhang", "lucia", "pedro"])
    last = R.choice(["smith", "garcia", "silva", "chen", "lopez", "o'neil", "souza", "wang", "fernandez", "kim"])
    last = last.replace("'", "")
    sep = R.choice([".", "_", "", "-"])
    tag = R.choice(["", "", "", "+news", str(R.randint(1, 99))])
    dom = R.choice(["example.com", "example.org", "mail.example.net", "correo.example.es", "empresa.example",
                    "exemplo.test", "example.com.br", "yunque.test"])  # fmt: skip
    return f"{first}{sep}{last}{tag}@{dom}"


def phone() -> str:
    a, b = R.randint(200, 999), R.randint(100, 999)
    fmts = [
        lambda: f"+1 ({R.randint(201, 989)}) 555-01{R.randint(0, 99):02d}",
        lambda: f"({R.randint(201, 989)}) 555-01{R.randint(0, 99):02d}",
        lambda: f"{R.randint(201, 989)}-555-01{R.randint(0, 99):02d}",
        lambda: f"+1-{R.randint(201, 989)}-555-01{R.randint(0, 99):02d}",
        lambda: f"+34 6{R.randint(10, 99)} {a} {b}",
        lambda: f"6{R.randint(10, 99)} {R.randint(10, 99)} {R.randint(10, 99)} {R.randint(10, 99)}",
        lambda: f"6{R.randint(10, 99)} {a} {b}",
        lambda: f"91 {a} {R.randint(10, 99)} {R.randint(10, 99)}",
        lambda: f"+52 55 {R.randint(1000, 9999)} {R.randint(1000, 9999)}",
        lambda: f"(55) {R.randint(1000, 9999)}-{R.randint(1000, 9999)}",
        lambda: f"+55 11 9{R.randint(1000, 9999)}-{R.randint(1000, 9999)}",
        lambda: f"(11) 9{R.randint(1000, 9999)}-{R.randint(1000, 9999)}",
        lambda: f"+54 9 11 {R.randint(1000, 9999)}-{R.randint(1000, 9999)}",
        lambda: f"11 4{R.randint(100, 999)}-{R.randint(1000, 9999)}",
        lambda: f"+86 13{R.randint(0, 9)} {R.randint(1000, 9999)} {R.randint(1000, 9999)}",
        lambda: f"1{R.choice('3589')}{R.randint(0, 9)}{R.randint(10000000, 99999999)}",
        lambda: f"010-{R.randint(60000000, 89999999)}",
        lambda: f"+44 20 7946 0{R.randint(100, 999)}",
        lambda: f"+{R.choice(['34', '351', '49', '33'])}{R.randint(600000000, 699999999)}",
        lambda: f"(+34) 6{R.randint(10, 99)} {a} {b}",
        lambda: f"0034 6{R.randint(10, 99)} {a} {b}",
        lambda: f"0{R.choice('67')} {R.randint(10, 99)} {R.randint(10, 99)} {R.randint(10, 99)} {R.randint(10, 99)}",
        lambda: f"+44 (0)20 7946 0{R.randint(100, 999)}",
        lambda: f"+7 495 {R.randint(100, 999)}-{R.randint(10, 99)}-{R.randint(10, 99)}",
    ]
    return R.choice(fmts)()


def ipv4() -> str:
    return R.choice([f"192.0.2.{R.randint(1, 254)}", f"198.51.100.{R.randint(1, 254)}", f"203.0.113.{R.randint(1, 254)}",
                     f"10.{R.randint(0, 255)}.{R.randint(0, 255)}.{R.randint(1, 254)}",
                     f"192.168.{R.randint(0, 255)}.{R.randint(1, 254)}", f"172.16.{R.randint(0, 31)}.{R.randint(1, 254)}"])  # fmt: skip


def ipv6() -> str:
    g = [f"{R.randint(0, 0xFFFF):x}" for _ in range(6)]
    return R.choice([f"2001:db8::{g[0]}:{g[1]}", f"2001:db8:{g[0]}:{g[1]}:{g[2]}:{g[3]}:{g[4]}:{g[5]}",
                     f"fe80::{g[0]}:{g[1]}:{g[2]}:{g[3]}", f"2001:DB8:{g[0].upper()}::{g[1].upper()}",
                     f"2001:0db8:85a3:0000:0000:8a2e:0370:{int(g[2], 16):04x}"])  # fmt: skip


def credit_card() -> str:
    brand = R.choice(["visa", "mc", "mc2", "amex", "disc", "jcb"])
    prefix, n = {"visa": ("4", 16), "mc": (str(R.randint(51, 55)), 16), "mc2": (str(R.randint(2221, 2720)), 16),
                 "amex": (R.choice(["34", "37"]), 15), "disc": ("6011", 16), "jcb": (str(R.randint(3528, 3589)), 16)}[brand]  # fmt: skip
    body = prefix + rs(DIG, n - 1 - len(prefix))
    num = body + luhn_digit(body)
    sep = R.choice([" ", "-", ""])
    if n == 15:
        return sep.join([num[:4], num[4:10], num[10:]])
    return sep.join(num[i : i + 4] for i in range(0, 16, 4))


def iban_check(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    return f"{98 - int(''.join(str(int(c, 36)) for c in rearranged)) % 97:02d}"


def iban() -> str:
    country, bban = R.choice([("ES", lambda: rs(DIG, 20)), ("DE", lambda: rs(DIG, 18)), ("GB", lambda: rs(UP, 4) + rs(DIG, 14)),
                              ("FR", lambda: rs(DIG, 23)), ("NL", lambda: rs(UP, 4) + rs(DIG, 10)), ("PT", lambda: rs(DIG, 21)),
                              ("IT", lambda: rs(UP, 1) + rs(DIG, 22)), ("BR", lambda: rs(DIG, 23) + "P1")])  # fmt: skip
    b = bban()
    compact = country + iban_check(country, b) + b
    if R.random() < 0.6:
        return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))
    return compact


def us_ssn() -> str:
    area = R.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{R.randint(1, 99):02d}-{R.randint(1, 9999):04d}"


DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def es_dni() -> str:
    n = R.randint(10000000, 99999999)
    return f"{n}{R.choice(['', '', '-'])}{DNI_LETTERS[n % 23]}"


def es_nie() -> str:
    p, n = R.randint(0, 2), R.randint(0, 9999999)
    return f"{'XYZ'[p]}{n:07d}{DNI_LETTERS[int(f'{p}{n:07d}') % 23]}"


def _date6() -> str:
    return f"{R.randint(0, 99):02d}{R.randint(1, 12):02d}{R.randint(1, 28):02d}"


def mx_curp() -> str:
    cons = "BCDFGHJKLMNPQRSTVWXYZ"
    yymmdd = _date6()
    diff = R.choice(DIG) if int(yymmdd[:2]) > 25 else R.choice(UP)
    base = (R.choice(UP) + R.choice("AEIOU") + rs(UP, 2) + yymmdd + R.choice("HM")
            + R.choice(["DF", "JC", "NL", "PL", "VZ", "YN", "GT", "MC"]) + rs(cons, 3) + diff)  # fmt: skip
    alphabet = "0123456789ABCDEFGHIJKLMNÑOPQRSTUVWXYZ"
    total = sum(alphabet.index(c) * (18 - i) for i, c in enumerate(base))
    return base + str((10 - total % 10) % 10)


def mx_rfc() -> str:
    return rs(UP, R.choice([3, 4])) + _date6() + rs(UP + DIG, 2) + R.choice(DIG + "A")


def br_cpf() -> str:
    d = [R.randint(0, 9) for _ in range(9)]
    for n in (9, 10):
        d.append(sum(d[i] * (n + 1 - i) for i in range(n)) * 10 % 11 % 10)
    s = "".join(map(str, d))
    return f"{s[:3]}.{s[3:6]}.{s[6:9]}-{s[9:]}"


def ar_cuit() -> str:
    while True:
        s = R.choice(["20", "23", "27", "30"]) + rs(DIG, 8)
        r = 11 - sum(int(c) * w for c, w in zip(s, (5, 4, 3, 2, 7, 6, 5, 4, 3, 2))) % 11
        if r != 10:  # a 10 means the agency would have issued another prefix
            return f"{s[:2]}-{s[2:]}-{0 if r == 11 else r}"


def cl_rut() -> str:
    body = str(R.randint(5000000, 25000000))
    r = 11 - sum(int(c) * (2 + i % 6) for i, c in enumerate(reversed(body))) % 11
    dv = {11: "0", 10: "K"}.get(r, str(r))
    if R.random() < 0.6:
        return f"{int(body):,}".replace(",", ".") + "-" + dv
    return f"{body}-{dv}"


def url_credentials() -> tuple[str, tuple[int, int]]:
    scheme = R.choice(["postgres", "postgresql", "mysql", "mongodb+srv", "redis", "https", "ftp", "amqp"])
    cred = f"{R.choice(['admin', 'app', 'deploy', 'svc_etl', 'root'])}:{rs(ALNUM, R.randint(10, 20))}"
    host = R.choice(["db.example.com", "pg.example.net:5432", "cache.internal.example", "files.example.org"])
    text = f"{scheme}://{cred}@{host}/{R.choice(['app', 'prod', '', 'data'])}"
    start = len(scheme) + 3
    return text, (start, start + len(cred))


def aws_access_key() -> str:
    return R.choice(["AKIAIOSFODNN7EXAMPLE", "AKIA" + rs(UP + "234567", 16), "ASIA" + rs(UP + "234567", 16)])


def _assign(name: str, value: str, style: str) -> tuple[str, tuple[int, int]]:
    pre = {"py": f'{name} = "', "json": f'"{name}": "', "yaml": f"{name}: ", "env": f"{name}=",
           "js": f"const {name} = '", "go": f'{name} := "'}[style]  # fmt: skip
    post = {"py": '"', "json": '"', "js": "'", "go": '"'}.get(style, "")
    return pre + value + post, (len(pre), len(pre) + len(value))


def aws_secret_key() -> tuple[str, tuple[int, int]]:
    name = R.choice(["aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "awsSecretKey"])
    return _assign(name, rs(ALNUM + "/+", 40), R.choice(["py", "yaml", "env", "json"]))


def github_token() -> str:
    if R.random() < 0.25:
        return "github_pat_" + rs(ALNUM, 22) + "_" + rs(ALNUM, 59)
    return f"gh{R.choice('pousr')}_" + rs(ALNUM, 36)


def gitlab_token() -> str:
    return "glpat-" + rs(ALNUM + "-_", 20)


def slack_token() -> str:
    if R.random() < 0.3:
        return f"https://hooks.slack.com/services/T{rs(UP + DIG, 8)}/B{rs(UP + DIG, 10)}/{rs(ALNUM, 24)}"
    return f"xox{R.choice('bpa')}-{rs(DIG, 12)}-{rs(DIG, 13)}-{rs(ALNUM, 24)}"


def _b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt() -> str:
    header = {"alg": R.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"}
    payload = {"sub": rs(DIG, 8), "name": R.choice(["Test User", "Ana Test"]), "iat": R.randint(1.6e9, 1.8e9)}
    return ".".join([_b64u(json.dumps(header).encode()), _b64u(json.dumps(payload).encode()),
                     _b64u(R.randbytes(32))])  # fmt: skip


def private_key() -> str:
    kind = R.choice(
        ["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "ENCRYPTED PRIVATE KEY"]
    )
    body = base64.b64encode(R.randbytes(48 * R.randint(3, 8))).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----"


def secret_assignment() -> tuple[str, tuple[int, int]]:
    if R.random() < 0.4:
        name = R.choice(
            ["password", "DB_PASSWORD", "db_pass", "passwd", "adminPassword", "contraseña", "senha", "SMTP_PASSWORD"]
        )
        value = (
            R.choice(["hunter", "dragon", "sol", "lua", "tigre", "sunshine", "casa"])
            + rs(DIG, R.randint(2, 4))
            + R.choice(["", "!", "xyz", "#"])
        )
    else:
        name = R.choice(
            [
                "api_key",
                "apiKey",
                "SECRET_KEY",
                "client_secret",
                "auth_token",
                "ACCESS_TOKEN",
                "stripe_secret",
                "openai_api_key",
            ]
        )
        value = R.choice(["", "sk_live_", "sk-", "key-", "tok_"]) + rs(ALNUM, R.randint(24, 40))
    return _assign(name, value, R.choice(["py", "json", "yaml", "env", "js", "go"]))


B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
BECH = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _bech32_checksum(hrp: str, data: list[int]) -> list[int]:
    gen = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
    values = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + data + [0] * 6
    chk = 1
    for v in values:
        b = chk >> 25
        chk = ((chk & 0x1FFFFFF) << 5) ^ v
        for i in range(5):
            chk ^= gen[i] if (b >> i) & 1 else 0
    pm = chk ^ 1
    return [(pm >> 5 * (5 - i)) & 31 for i in range(6)]


def bitcoin_address() -> str:
    if R.random() < 0.35:
        prog = R.randbytes(20)
        bits = "".join(f"{b:08b}" for b in prog)
        data = [0] + [int(bits[i : i + 5].ljust(5, "0"), 2) for i in range(0, len(bits), 5)]
        return "bc1" + "".join(BECH[d] for d in data + _bech32_checksum("bc", data))
    raw = bytes([R.choice([0, 5])]) + R.randbytes(20)
    raw += hashlib.sha256(hashlib.sha256(raw).digest()).digest()[:4]
    n, out = int.from_bytes(raw, "big"), ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


def ethereum_address() -> str:
    h = R.randbytes(20).hex()
    if R.random() < 0.5:
        return "0x" + h
    k = keccak256(h.encode()).hex()
    return "0x" + "".join(c.upper() if int(k[i], 16) >= 8 else c for i, c in enumerate(h))


def password_value() -> str:
    return R.choice(["Abc", "Qwe", "Sol", "Lua", "Mar"]) + rs(DIG, R.randint(3, 5)) + R.choice(["!", "#", "xyz", "$"])


def api_token_value() -> str:
    return R.choice(["", "sk_live_", "tok_"]) + rs(ALNUM, R.randint(28, 40))


# Value-only slots: the surrounding name is hand-written in the template.
ALIAS = {"PASSWORD_VALUE": "SECRET_ASSIGNMENT", "API_TOKEN_VALUE": "SECRET_ASSIGNMENT"}

GEN = {
    "PASSWORD_VALUE": password_value, "API_TOKEN_VALUE": api_token_value,
    "EMAIL": email, "PHONE": phone, "IPV4": ipv4, "IPV6": ipv6, "CREDIT_CARD": credit_card, "IBAN": iban,
    "US_SSN": us_ssn, "ES_DNI": es_dni, "ES_NIE": es_nie, "MX_CURP": mx_curp, "MX_RFC": mx_rfc, "BR_CPF": br_cpf,
    "AR_CUIT": ar_cuit, "CL_RUT": cl_rut, "URL_CREDENTIALS": url_credentials, "AWS_ACCESS_KEY": aws_access_key,
    "AWS_SECRET_KEY": aws_secret_key, "GITHUB_TOKEN": github_token, "GITLAB_TOKEN": gitlab_token,
    "SLACK_TOKEN": slack_token, "JWT": jwt, "PRIVATE_KEY": private_key, "SECRET_ASSIGNMENT": secret_assignment,
    "BITCOIN_ADDRESS": bitcoin_address, "ETHEREUM_ADDRESS": ethereum_address,
}  # fmt: skip

from pii_templates import NEGATIVES, TEMPLATES, negatives_generated  # noqa: E402 (hand-written contexts)


def fill(template: str, lang: str) -> dict:
    text, spans, pos = "", [], 0
    for m in re.finditer(r"\{([A-Z0-9_]+)\}", template):
        text += template[pos : m.start()]
        out = GEN[m.group(1)]()
        value, (s, e) = out if isinstance(out, tuple) else (out, (0, len(out)))
        spans.append({"type": ALIAS.get(m.group(1), m.group(1)), "start": len(text) + s, "end": len(text) + e})
        text += value
        pos = m.end()
    return {"text": text + template[pos:], "spans": spans, "lang": lang}


def build() -> list[dict]:
    cases = []
    for _ in range(3):  # three fills per context: different values, same hand-written text
        for lang, template in TEMPLATES:
            cases.append(fill(template, lang))
    for lang, text in NEGATIVES:
        cases.append({"text": text, "spans": [], "lang": lang})
    for lang, text in negatives_generated(R, sys.modules[__name__]):
        cases.append({"text": text, "spans": [], "lang": lang})
    return cases


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("pii_cases.jsonl")
    rows = build()
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} cases to {out}")
