"""Synthetic people, organisations, network addresses and secrets for the demo's domain data.

Everything is made up and drawn from a caller's `random.Random`, so a seed fixes it. The
values are *realistic* on purpose, because `yunque data prepare` must find and scrub them:
e-mail addresses at real-looking company domains (not example.com, which scrubbers treat as
a documentation placeholder), phone numbers in the reserved fictional ranges (NANP 555-01xx,
Ofcom's drama range), card numbers with a valid Luhn digit, AWS-shaped key pairs, signed
JWTs and passwords in config lines. Organisations are Microsoft's fictional companies
(Contoso, Fabrikam, Woodgrove Bank, ...): realistic without impersonating a real brand.
Public IPs come from the documentation ranges of RFC 5737, internal ones from RFC 1918.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import string

FIRST = (
    "Alice",
    "Bruno",
    "Chen",
    "Dana",
    "Elif",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jamal",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
)
LAST = (
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Silva",
    "Novak",
    "Haddad",
    "Kowalski",
    "Reyes",
    "Mensah",
    "Fischer",
    "Rossi",
    "Nakamura",
    "Dubois",
    "Petrov",
    "Garcia",
    "Ibrahim",
    "Larsen",
    "Costa",
    "Sato",
)

# name -> (official domain, what they send about)
ORGS: dict[str, tuple[str, str]] = {
    "Woodgrove Bank": ("woodgrovebank.com", "bank"),
    "Contoso": ("contoso.com", "it"),
    "Fabrikam": ("fabrikam.com", "it"),
    "Northwind Traders": ("northwindtraders.com", "shop"),
    "Tailspin Toys": ("tailspintoys.com", "shop"),
    "Litware": ("litwareinc.com", "saas"),
    "Proseware": ("proseware.com", "saas"),
    "Blue Yonder Airlines": ("blueyonderairlines.com", "travel"),
    "Margie's Travel": ("margiestravel.com", "travel"),
    "Humongous Insurance": ("humongousinsurance.com", "bank"),
    "Wide World Importers": ("wideworldimporters.com", "shop"),
    "Consolidated Messenger": ("consolidatedmessenger.com", "parcel"),
    "Adventure Works": ("adventure-works.com", "shop"),
    "City Power & Light": ("cpandl.com", "utility"),
}
BAD_TLDS = ("top", "xyz", "info", "biz", "online", "site", "live", "click")
_KEY_CHARS = string.ascii_uppercase + "234567"
_SECRET_CHARS = string.ascii_letters + string.digits + "+/"


def person(rng: random.Random) -> tuple[str, str]:
    """(full name, login) e.g. ("Dana Okafor", "dana.okafor")."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return f"{first} {last}", f"{first.lower()}.{last.lower()}"


def email(rng: random.Random, login: str | None = None, domain: str | None = None) -> str:
    login = login or person(rng)[1]
    domain = domain or rng.choice([d for d, _ in ORGS.values()])
    return f"{login}@{domain}"


def phone(rng: random.Random) -> str:
    if rng.random() < 0.7:
        area = rng.choice(("202", "312", "415", "617", "646", "737"))
        return rng.choice(("+1 ({a}) 555-01{n:02d}", "+1 {a}-555-01{n:02d}", "({a}) 555-01{n:02d}")).format(
            a=area, n=rng.randrange(100)
        )
    return f"+44 20 7946 0{rng.randrange(1000):03d}"


def luhn_digit(digits: str) -> int:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:  # every second digit from the right of the payload is doubled
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return (10 - total % 10) % 10


def credit_card(rng: random.Random) -> str:
    """A Visa/Mastercard-shaped 16-digit number with a valid Luhn check digit, grouped in fours."""
    payload = rng.choice(("4", "51", "52", "53", "54", "55"))
    payload += "".join(rng.choice(string.digits) for _ in range(15 - len(payload)))
    number = payload + str(luhn_digit(payload))
    return " ".join(number[i : i + 4] for i in range(0, 16, 4))


def aws_keys(rng: random.Random) -> tuple[str, str]:
    key_id = "AKIA" + "".join(rng.choice(_KEY_CHARS) for _ in range(16))
    secret = "".join(rng.choice(_SECRET_CHARS) for _ in range(40))
    return key_id, secret


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt(rng: random.Random, subject: str) -> str:
    """An HS256 JWT, really signed (with a random key), so it looks like a live session token."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"sub": subject, "iat": 1700000000 + rng.randrange(30_000_000), "role": rng.choice(("user", "admin"))}
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    key = rng.randbytes(32)
    sig = _b64url(hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    return f"{header}.{payload}.{sig}"


def password(rng: random.Random) -> str:
    word = rng.choice(("Summer", "Winter", "Falcon", "Orchid", "Tiger", "Harbor", "Maple", "Quartz"))
    return f"{word}{rng.randrange(1990, 2026)}{rng.choice('!#$%&*?')}{rng.choice(string.ascii_lowercase)}"


def public_ip(rng: random.Random) -> str:
    net = rng.choice(("192.0.2", "198.51.100", "203.0.113"))
    return f"{net}.{rng.randrange(1, 255)}"


def private_ip(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    return f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def bad_domain(rng: random.Random, org_domain: str | None = None) -> str:
    """A lookalike of `org_domain` (typo, hyphenated add-on, sub-domain trick) or a random malicious-looking one."""
    words = ("secure", "login", "verify", "account", "update", "support", "billing", "auth", "cdn", "mail")
    tld = rng.choice(BAD_TLDS + ("com", "net"))
    if org_domain is None:
        return f"{rng.choice(words)}-{rng.choice(words)}{rng.randrange(10, 99)}.{tld}"
    base = org_domain.rsplit(".", 1)[0]
    kind = rng.randrange(4)
    if kind == 0:
        swaps = [(c, r) for c, r in (("o", "0"), ("l", "1"), ("i", "1"), ("e", "3"), ("m", "rn")) if c in base]
        c, r = rng.choice(swaps) if swaps else ("", "-")
        return base.replace(c, r, 1) + "." + rng.choice(("com", "net"))
    if kind == 1:
        return f"{base}-{rng.choice(words)}.{tld}"
    if kind == 2:
        return f"{base}.{rng.choice(words)}-{rng.choice(words)}.{tld}"
    return f"{rng.choice(words)}-{base}.{tld}"


def md5(rng: random.Random) -> str:
    return hashlib.md5(rng.randbytes(24)).hexdigest()


def sha256(rng: random.Random) -> str:
    return hashlib.sha256(rng.randbytes(24)).hexdigest()
