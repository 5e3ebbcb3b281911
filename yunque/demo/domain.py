"""A security-domain instruction set, generated deterministically in code (no model, no download).

Three tasks, each with one fixed system prompt and short, exactly checkable answers, so that
accuracy (exact match) means something for a small model fine-tuned for a few minutes:

    auth_triage   an sshd or web-login log snippet; answer "<ip>, <failures>" for the address
                  with the most failed logins. The attacker's lines are scattered at random
                  among successful logins, failures from other addresses and connection noise,
                  and it has strictly more failures than any other address, so the answer is
                  unique and must be found (and counted) in the log.
    phishing      a short e-mail (From, Subject, body, link, signature); answer "phishing" or
                  "legitimate". The ground truth is structural, as a mail analyst would judge
                  it: a message is legitimate iff its sender and every link are on the official
                  domain of the organisation it comes from; phishing uses lookalike or unrelated
                  domains. Wording is *not* a giveaway: legitimate security notices also say
                  "verify" and "immediately", some phishing is calm. Classes are exactly balanced.
    ioc_extract   an EDR/proxy/mail/IDS alert; answer "ips: ...; domains: ...; hashes: ..." with
                  each list in order of first appearance, "none" when empty. Addresses inside
                  e-mail addresses are people, not indicators, and do not count.

Records are chat messages (system, user, assistant) as JSON Lines with a `task` field and a
`meta` field (planted PII types, planted duplicates) that `yunque data prepare` ignores.
Part of the records carry realistic synthetic PII and secrets (see `yunque.demo.synthetic`)
in places that do not change the answer: a reporter line, a signature, the user field of a
web log, a leaked config line, a bearer token. Some records are planted exact and near
duplicates (a copy with a short remark appended) so that deduplication has work to do.
The same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from yunque.demo import synthetic as syn
from yunque.errors import ConfigError

TASKS = ("auth_triage", "phishing", "ioc_extract")
SYSTEM = {
    "auth_triage": "You are a SOC analyst. Find the IP address with the most failed logins. Answer: IP, count.",
    "phishing": "You are a mail security filter. Classify the message. Answer: phishing or legitimate.",
    "ioc_extract": "You extract indicators from alerts. Answer: ips: ...; domains: ...; hashes: ... (none if empty).",
}
QUICK_RECORDS = 600
DEFAULT_RECORDS = 3000
_REMARKS = ("Thanks.", "Please advise.", "(forwarded again)", "Sent from my phone.", "Any update?")


@dataclass
class DomainInfo:
    path: str
    sha256: str
    records: int
    per_task: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)  # phishing / legitimate
    with_pii: int = 0
    pii_types: dict[str, int] = field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0


def task_of(messages: list[dict]) -> str | None:
    """The task of a conversation, from its system prompt (survives `data prepare`, which drops `task`)."""
    if messages and messages[0].get("role") == "system":
        for task, prompt in SYSTEM.items():
            if messages[0]["content"].strip() == prompt:
                return task
    return None


def normalize_answer(text: str) -> str:
    """Exact match ignores case, surrounding space and runs of whitespace, nothing else."""
    return " ".join(text.strip().lower().split())


def answers_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


# --- auth_triage -------------------------------------------------------------------------

_SSH_USERS = ("root", "admin", "ubuntu", "test", "oracle", "postgres", "git", "deploy", "user", "pi")


def _auth_triage(rng: random.Random, pii: bool) -> tuple[str, str, list[str]]:
    web = rng.random() < 0.5
    host = rng.choice(("bastion", "web01", "vpn-gw", "db02", "jump1", "app03"))
    attacker = syn.public_ip(rng)
    count = rng.randint(3, 6)
    used = {attacker}

    def fresh_ip() -> str:
        while (ip := syn.public_ip(rng) if rng.random() < 0.6 else syn.private_ip(rng)) in used:
            pass
        used.add(ip)
        return ip

    planted: list[str] = []
    people = [syn.person(rng) for _ in range(3)]
    logins = [syn.email(rng, p[1]) if web and pii else (p[1] if web else p[1].split(".")[0]) for p in people]
    if web and pii:
        planted.append("EMAIL")
    events = [("fail", attacker, rng.choice(_SSH_USERS if not web else logins + ["admin"])) for _ in range(count)]
    # 2-4 other lines keep the snippet short (<= 10 lines, ~200 tokens) while making the attacker
    # something to find: mistyped passwords from other addresses (always fewer than the attacker's),
    # successful logins (sometimes from an address that also failed) and pre-auth connection noise.
    other_fails: dict[str, int] = {}
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(("fail", "ok", "ok", "noise"))
        if kind == "fail":
            ip = rng.choice(sorted(other_fails)) if other_fails and rng.random() < 0.5 else fresh_ip()
            if other_fails.get(ip, 0) + 1 >= count:
                ip = fresh_ip()
            other_fails[ip] = other_fails.get(ip, 0) + 1
            events.append(("fail", ip, rng.choice(logins)))
        elif kind == "ok":
            events.append(("ok", fresh_ip() if rng.random() < 0.7 else rng.choice(sorted(used)), rng.choice(logins)))
        else:
            events.append(("noise", attacker if rng.random() < 0.5 else fresh_ip(), ""))
    rng.shuffle(events)
    t = start = datetime(2024, 1, 1) + timedelta(days=rng.randrange(365), seconds=rng.randrange(86400))
    leak = web and pii and rng.random() < 0.5
    lines = []
    # Lines are condensed (time of day, no pid / port) to keep a snippet near 200 tokens: with
    # digits split in threes, a full syslog prefix alone costs ~15 tokens per line.
    for kind, ip, user in events:
        t += timedelta(seconds=rng.randint(1, 40))
        ts = f"{t:%H:%M:%S}"
        if web:
            if kind == "noise":
                lines.append(f"{ts} GET /login 200 ip={ip}")
            else:
                status = "401" if kind == "fail" else "302"
                extra = f" password={syn.password(rng)}" if leak and kind == "fail" and rng.random() < 0.4 else ""
                lines.append(f"{ts} POST /login {status} user={user}{extra} ip={ip}")
        else:
            if kind == "fail":
                invalid = "invalid user " if user in _SSH_USERS and user not in ("root", "deploy", "git") else ""
                lines.append(f"{ts} sshd: Failed password for {invalid}{user} from {ip}")
            elif kind == "ok":
                lines.append(f"{ts} sshd: Accepted {rng.choice(('publickey', 'password'))} for {user} from {ip}")
            else:
                lines.append(f"{ts} sshd: Connection closed by {ip} [preauth]")
    if leak and any("password=" in line for line in lines):
        planted.append("SECRET_ASSIGNMENT")
    header = ""
    if pii and (rng.random() < 0.6 or not planted):
        name, login = syn.person(rng)
        header = f"Ticket from {name} <{syn.email(rng, login)}>, {syn.phone(rng)}:\n"
        planted += ["EMAIL", "PHONE"]
    question = rng.choice(("Which IP is brute-forcing, and how many failed logins?",
                           "Who is brute-forcing this host, and how many failures?",
                           "Find the brute-force source and its failure count."))
    user_text = f"{header}Auth log from {host}, {start:%Y-%m-%d}:\n" + "\n".join(lines) + f"\n\n{question}"
    return user_text, f"{attacker}, {count}", sorted(set(planted))


# --- phishing ----------------------------------------------------------------------------

_LEGIT = {
    "bank": [("Your {month} statement is ready", "Your statement for {month} is now available in online banking. View it at {link}"),
             ("New sign-in to your account", "We noticed a new sign-in from {city}. If this was you, no action is needed. If not, verify your recent activity at {link}")],
    "it": [("Scheduled maintenance on Saturday", "Email and VPN will be unavailable from 22:00 to 23:30 on Saturday. Details: {link}"),
           ("Your password expires in 7 days", "Your network password expires in 7 days. Change it on the self-service portal: {link}")],
    "shop": [("Your order #{order} has shipped", "Good news! Order #{order} is on its way and should arrive {day}. Track it here: {link}"),
             ("Receipt for order #{order}", "Thank you for your purchase. Your receipt for order #{order} ({amount}) is at {link}")],
    "saas": [("Your invoice for {month}", "Your invoice of {amount} for {month} is available. Download it from {link}"),
             ("Security alert: new device", "A new device signed in to your workspace from {city}. Review your devices immediately at {link}")],
    "travel": [("Booking {ref} confirmed", "Your booking {ref} to {city} on {day} is confirmed. Manage your trip at {link}"),
               ("Check-in is open for {ref}", "Online check-in for your flight to {city} is now open. Check in at {link}")],
    "parcel": [("Delivery scheduled for {day}", "Your parcel {ref} will be delivered {day} between 9:00 and 13:00. Reschedule at {link}")],
    "utility": [("Your bill is ready", "Your bill of {amount} is ready and will be paid by direct debit on {day}. See it at {link}")],
}
_PHISH = [
    ("Unusual sign-in activity", "We detected unusual activity on your {org} account. Verify your identity within 24 hours or your account will be suspended: {link}"),
    ("Action required: mailbox full", "Your mailbox has exceeded its storage limit. Log in now to keep receiving mail: {link}"),
    ("Delivery failed: fee required", "We could not deliver parcel {ref}. Pay the {amount} redelivery fee here: {link}"),
    ("Invoice {order} overdue", "Please find the overdue invoice {order} of {amount}. Review and settle it today: {link}"),
    ("Your password expires today", "Your {org} password expires today. Keep your current password by confirming it at {link}"),
    ("Refund of {amount} pending", "You are eligible for a refund of {amount}. Submit your card details to receive it: {link}"),
    ("Shared document: Q{q} bonus plan", "{name} shared a document with you: Q{q} bonus plan. Open it at {link}"),
]
_CITIES = ("Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Austin", "Lyon", "Seoul", "Lima", "Oslo")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")
_DAYS = ("today", "tomorrow", "on Monday", "on Tuesday", "on Thursday", "on Friday")


def _phishing(rng: random.Random, pii: bool, label: str) -> tuple[str, str, list[str]]:
    org = rng.choice(sorted(syn.ORGS))
    domain, sector = syn.ORGS[org]
    slots = {"org": org, "month": rng.choice(_MONTHS), "city": rng.choice(_CITIES), "day": rng.choice(_DAYS),
             "order": str(rng.randint(100000, 999999)), "ref": f"{rng.choice('BKRZ')}{rng.randint(10000, 99999)}",
             "amount": f"${rng.randint(2, 900)}.{rng.randint(0, 99):02d}", "q": str(rng.randint(1, 4)),
             "name": syn.person(rng)[0]}
    path = rng.choice(("account", "login", "orders", "billing", "security", "docs", "help"))
    if label == "legitimate":
        subject, body = rng.choice(_LEGIT[sector])
        host = rng.choice((domain, f"www.{domain}", f"{rng.choice(('account', 'my', 'portal'))}.{domain}"))
        sender = f"{rng.choice(('no-reply', 'alerts', 'service', 'billing', 'it'))}@{domain}"
        link = f"https://{host}/{path}"
    else:
        subject, body = rng.choice(_PHISH)
        bad = syn.bad_domain(rng, domain if rng.random() < 0.8 else None)
        sender_dom = bad if rng.random() < 0.6 else syn.bad_domain(rng, domain)
        sender = f"{rng.choice(('no-reply', 'security', 'support', 'account', 'admin'))}@{sender_dom}"
        link = f"{rng.choice(('http', 'https'))}://{bad}/{path}"
    slots["link"] = link
    first, last = rng.choice(syn.FIRST), rng.choice(syn.LAST)
    # Greetings and sign-offs are shared by both classes: variety, so that two messages from one
    # template are not near duplicates, without a label cue.
    greeting = rng.choice(("", f"Hi {first},\n", f"Hello {first},\n", "Dear customer,\n", f"Dear {first} {last},\n"))
    closing = rng.choice(("", f"\nThanks,\nThe {org} team", f"\nKind regards,\n{org}", f"\n{org} Customer Care",
                          "\nPlease do not reply to this message."))
    text = f"From: {org} <{sender}>\nSubject: {subject.format(**slots)}\n\n{greeting}{body.format(**slots)}{closing}"
    planted: list[str] = []
    if pii:  # independent of the label, so scrubbing can never leak it
        name, login = syn.person(rng)
        choice = rng.randrange(3)
        if choice == 0:
            text = f"Reported by {name} <{syn.email(rng, login)}>:\n{text}"
            planted.append("EMAIL")
        elif choice == 1:
            text += f"\n--\n{name} | {syn.phone(rng)} | {syn.email(rng, login)}"
            planted += ["EMAIL", "PHONE"]
        else:
            text = f"Reported by {name}, who says card {syn.credit_card(rng)} may be affected:\n{text}"
            planted.append("CREDIT_CARD")
    question = rng.choice(("Is this message phishing or legitimate?", "Classify this e-mail.", "Phishing or legitimate?"))
    return f"{text}\n\n{question}", label, planted


# --- ioc_extract -------------------------------------------------------------------------

def _ioc_extract(rng: random.Random, pii: bool) -> tuple[str, str, list[str]]:
    ips = [syn.public_ip(rng) for _ in range(rng.randint(1, 2))]
    domains = [syn.bad_domain(rng) for _ in range(rng.randint(0, 2))]
    # Mostly one hash, MD5 more often than SHA-256: a SHA-256 costs ~50 tokens to read and to copy.
    n_hashes = rng.choices((0, 1, 2), weights=(0.35, 0.5, 0.15))[0]
    hashes = [syn.md5(rng) if rng.random() < 0.6 else syn.sha256(rng) for _ in range(n_hashes)]
    host = f"{rng.choice(('WS', 'LT', 'SRV'))}-{rng.randint(100, 9999):04d}"
    local = syn.private_ip(rng)
    proc = rng.choice(("powershell.exe", "rundll32.exe", "mshta.exe", "wscript.exe", "curl", "python3"))
    parts = []
    for ip in ips:
        parts.append(rng.choice((f"connection to {ip}:{rng.choice((443, 8080, 4444, 53))}",
                                 f"outbound traffic to {ip}", f"callback to {ip}")))
    for d in domains:
        parts.append(rng.choice((f"DNS query for {d}", f"download from http://{d}/{rng.choice(('a', 'x', 'dl'))}/{rng.randint(1, 99)}",
                                 f"beacon to {d}")))
    for h in hashes:
        kind = "MD5" if len(h) == 32 else "SHA-256"
        parts.append(rng.choice((f"dropped file {kind} {h}", f"payload {kind} {h}", f"{kind} {h} written to disk")))
    rng.shuffle(parts)
    source = rng.choice(("EDR", "Proxy", "IDS", "Mail gateway"))
    alert = f"{source} alert on {host} ({local}): {proc} " + "; ".join(parts) + "."
    # The answer lists indicators as they appear in the text, so read the order back from it.
    found = [("ips", v, _position(alert, v)) for v in ips + [local]]
    found += [("domains", v, _position(alert, v)) for v in domains] + [("hashes", v, _position(alert, v)) for v in hashes]
    order = sorted(found, key=lambda f: f[2])
    answer = "; ".join(
        f"{kind}: " + (", ".join(dict.fromkeys(v for k, v, _ in order if k == kind)) or "none")
        for kind in ("ips", "domains", "hashes"))
    planted: list[str] = []
    if pii:
        name, login = syn.person(rng)
        choice = rng.randrange(3)
        if choice == 0:
            alert = f"Analyst: {name} <{syn.email(rng, login)}>, on call {syn.phone(rng)}\n{alert}"
            planted += ["EMAIL", "PHONE"]
        elif choice == 1:
            key_id, secret = syn.aws_keys(rng)
            alert += f"\nFound in config.ini:\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}"
            planted += ["AWS_ACCESS_KEY", "AWS_SECRET_KEY"]
        else:
            alert += f"\nRequest header: Authorization: Bearer {syn.jwt(rng, login)}"
            planted.append("JWT")
    question = rng.choice(("Extract the indicators.", "List the IOCs.", "Which indicators are in this alert?"))
    return f"Alert:\n{alert}\n\n{question}", answer, planted


def _position(text: str, value: str) -> int:
    """First whole-token occurrence: 198.51.100.2 must not be found inside 198.51.100.23."""
    return re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w-]|\.\w)", text).start()


# --- the data set ------------------------------------------------------------------------

def generate(n: int = DEFAULT_RECORDS, seed: int = 0, pii_fraction: float = 0.3,
             duplicate_fraction: float = 0.03, near_duplicate_fraction: float = 0.03) -> list[dict]:
    """`n` records (planted duplicates included), tasks in equal shares, in a seeded random order."""
    if n < 2 * len(TASKS):
        raise ConfigError(f"domain records: need at least {2 * len(TASKS)}, got {n}")
    for name, v in (("pii_fraction", pii_fraction), ("duplicate_fraction", duplicate_fraction),
                    ("near_duplicate_fraction", near_duplicate_fraction)):
        if not 0 <= v <= 1:
            raise ConfigError(f"domain {name}: must be in [0, 1], got {v}")
    rng = random.Random(seed)
    n_dup, n_near = round(n * duplicate_fraction), round(n * near_duplicate_fraction)
    base = n - n_dup - n_near
    tasks = [TASKS[i % len(TASKS)] for i in range(base)]
    labels = ["phishing", "legitimate"] * (base // 2 + 1)
    records = []
    for i, task in enumerate(tasks):
        pii = rng.random() < pii_fraction
        if task == "auth_triage":
            user, answer, planted = _auth_triage(rng, pii)
        elif task == "phishing":
            user, answer, planted = _phishing(rng, pii, labels[i // len(TASKS)])
        else:
            user, answer, planted = _ioc_extract(rng, pii)
        records.append(_record(task, user, answer, {"pii": planted}))
    # Distinct sources: two near copies of one record with the same remark would be an exact pair.
    for src in rng.sample(range(base), n_dup):
        records.append({**records[src], "meta": {**records[src]["meta"], "duplicate_of": src}})
    for src in rng.sample(range(base), n_near):
        rec = records[src]
        user = rec["messages"][1]["content"] + f"\n{rng.choice(_REMARKS)}"
        records.append(_record(rec["task"], user, rec["messages"][2]["content"],
                               {**rec["meta"], "near_duplicate_of": src}))
    rng.shuffle(records)
    return records


def _record(task: str, user: str, answer: str, meta: dict) -> dict:
    return {"task": task, "messages": [{"role": "system", "content": SYSTEM[task]},
                                       {"role": "user", "content": user},
                                       {"role": "assistant", "content": answer}], "meta": meta}


def write_domain(path: str | Path, n: int = DEFAULT_RECORDS, seed: int = 0, **kwargs) -> DomainInfo:
    """Generate and write the records as JSON Lines; returns counts and the file's SHA-256."""
    records = generate(n, seed, **kwargs)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    info = DomainInfo(path=str(out), sha256=hashlib.sha256(data).hexdigest(), records=len(records))
    for r in records:
        info.per_task[r["task"]] = info.per_task.get(r["task"], 0) + 1
        if r["task"] == "phishing":
            label = r["messages"][2]["content"]
            info.labels[label] = info.labels.get(label, 0) + 1
        if r["meta"]["pii"]:
            info.with_pii += 1
            for t in r["meta"]["pii"]:
                info.pii_types[t] = info.pii_types.get(t, 0) + 1
        info.exact_duplicates += "duplicate_of" in r["meta"]
        info.near_duplicates += "near_duplicate_of" in r["meta"]
    info.pii_types = dict(sorted(info.pii_types.items()))
    return info


def info_dict(info: DomainInfo) -> dict:
    return asdict(info)
