"""The demo's data sources: the stdlib corpus and the generated security instruction set.

Answers are checked by `solve`, written here from the task definitions alone: it reads the
prompt text the way an analyst would and never looks at how the generator built it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from yunque.demo import corpus, domain
from yunque.demo.synthetic import ORGS, luhn_digit
from yunque.errors import DataError

IP = r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)"
TLDS = "com|net|org|io|top|xyz|info|biz|online|site|live|click"
DOMAIN = rf"(?<![\w.@-])(?:[a-z0-9-]+\.)+(?:{TLDS})(?![\w-])"
HASH = r"(?<![0-9A-Za-z])(?:[0-9a-f]{64}|[0-9a-f]{32})(?![0-9A-Za-z])"
EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"


FAIL = [
    rf"Failed password for (?:invalid user )?(\S+) from ({IP})$",
    rf"POST /login 401 user=(\S+)(?: password=\S+)? ip=({IP})$",
]
PROBE = [
    rf"sshd: (?:Did not receive identification string from|Connection reset by|Unable to negotiate with"
    rf"|banner exchange: Connection from) ({IP})\b",
    rf"GET /\S* 404 ip=({IP})$",
]
TACTIC_CUES = {  # an analyst's reading of the behaviour, independent of the generator's tables
    "execution": r"EncodedCommand|mshta\.exe|wscript\.exe|cmd\.exe /c|bash -c",
    "persistence": r"schtasks /create|\\Run\\|new service|crontab|authorized_keys",
    "credential-access": r"lsass|sekurlsa|HKLM\\SAM|MiniDump|TGS requests",
    "discovery": r"net group|nltest|AdFind|whoami|probed on ports",
    "command-and-control": r"beacon to|DNS TXT|self-signed|JA3|reverse shell",
    "exfiltration": r"rclone|uploaded to|7z archive|curl -T|USB mass-storage",
}


def solve(task: str, prompt: str) -> str:
    if task == "auth_triage":
        fails, probes = Counter(), Counter()
        for pattern in FAIL:
            fails.update(ip for _user, ip in re.findall(pattern, prompt, re.M))
        for pattern in PROBE:
            probes.update(re.findall(pattern, prompt, re.M))
        if fails and fails.most_common(1)[0][1] >= 4:
            assert not probes
            return "brute-force"
        if probes:
            assert probes.most_common(1)[0][1] >= 4 and not fails
            return "scan"
        assert fails.total() <= 2 and all(n == 1 for n in fails.values())
        return "benign"
    if task == "phishing":
        # Legitimate iff the sender (unless scrubbed) and every link are on the official domain
        # of the organisation the message claims to come from.
        org, sender = re.search(r"^From: (.*) <(?:[^@>]+@([^>]+)|\[EMAIL\])>$", prompt, re.M).groups()
        official = ORGS[org][0]
        hosts = re.findall(r"https?://([^/\s]+)", prompt)
        ok = sender in (None, official) and hosts and all(h == official or h.endswith("." + official) for h in hosts)
        return "legitimate" if ok else "phishing"
    (tactic,) = [t for t, cue in TACTIC_CUES.items() if re.search(cue, prompt)]
    return tactic


def scrub_like(text: str) -> str:
    """What a PII scrubber does to the planted values (IPs are indicators here and stay)."""
    text = re.sub(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", "[JWT]", text)
    text = re.sub(EMAIL, "[EMAIL]", text)
    text = re.sub(r"\b\d{4} \d{4} \d{4} \d{4}\b", "[CREDIT_CARD]", text)
    text = re.sub(r"(aws_\w+ = )\S+", r"\1[SECRET]", text)
    text = re.sub(r"password=\S+", "password=[SECRET]", text)
    return re.sub(r"(\+\d+ )?(\(\d{3}\) |\d{3}-)?555-01\d\d|\+44 20 7946 0\d{3}", "[PHONE]", text)


@pytest.fixture(scope="module")
def records():
    return domain.generate(3000, seed=0)


def _base(records):
    return [r for r in records if "duplicate_of" not in r["meta"] and "near_duplicate_of" not in r["meta"]]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = domain.write_domain(tmp_path / "a.jsonl", 300, seed=3)
    b = domain.write_domain(tmp_path / "b.jsonl", 300, seed=3)
    c = domain.write_domain(tmp_path / "c.jsonl", 300, seed=4)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a.sha256 == b.sha256 == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    assert c.sha256 != a.sha256
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == a.records == 300
    rec = json.loads(lines[0])
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"] and rec["task"] in domain.TASKS


def test_every_answer_recomputed_from_the_prompt(records):
    for r in records:
        assert domain.task_of(r["messages"]) == r["task"]
        prompt, answer = r["messages"][1]["content"], r["messages"][2]["content"]
        assert solve(r["task"], prompt) == answer, prompt


def test_scrubbing_the_planted_pii_never_changes_an_answer(records):
    with_pii = [r for r in records if r["meta"]["pii"]]
    changed = 0
    for r in with_pii:
        prompt = r["messages"][1]["content"]
        scrubbed = scrub_like(prompt)
        changed += scrubbed != prompt
        assert solve(r["task"], scrubbed) == r["messages"][2]["content"], scrubbed
    assert changed == len(with_pii)  # every record said to carry PII really does


def test_balance_and_difficulty(records):
    base = _base(records)
    tasks = Counter(r["task"] for r in base)
    assert max(tasks.values()) - min(tasks.values()) <= 1
    labels = Counter(r["messages"][2]["content"] for r in base if r["task"] == "phishing")
    assert set(labels) == {"phishing", "legitimate"} and abs(labels["phishing"] - labels["legitimate"]) <= 1
    for task, labels in (("auth_triage", domain.VERDICTS), ("alert_tactic", domain.TACTICS)):
        got = Counter(r["messages"][2]["content"] for r in base if r["task"] == task)
        assert set(got) == set(labels) and max(got.values()) - min(got.values()) <= 1
    # Wording alone does not give the label away: "verify" appears in both classes.
    verify = Counter(
        r["messages"][2]["content"]
        for r in base
        if r["task"] == "phishing" and "verify" in r["messages"][1]["content"].lower()
    )
    assert verify["phishing"] > 0 and verify["legitimate"] > 0
    # Attacks and scans have the same range of lines from the attacker, and brute force both
    # repeats one account and walks a list of them.
    lines, lists = {}, Counter()
    for r in base:
        verdict, text = r["messages"][2]["content"], r["messages"][1]["content"]
        if r["task"] == "auth_triage" and verdict != "benign":
            hits = [m for p in (FAIL if verdict == "brute-force" else PROBE) for m in re.findall(p, text, re.M)]
            lines.setdefault(verdict, set()).add(len(hits))
            if verdict == "brute-force":
                lists[len({user for user, _ip in hits}) > 1] += 1
    assert lines["brute-force"] == lines["scan"] == {4, 5, 6, 7}
    assert min(lists[True], lists[False]) > 0.3 * sum(lists.values())
    # Indicators are in every tactic class, so none of them is the cue.
    for tactic in domain.TACTICS:
        texts = [r["messages"][1]["content"] for r in base if r["messages"][2]["content"] == tactic]
        assert sum(bool(re.search(HASH, t)) for t in texts) > len(texts) / 5
        assert sum(bool(re.search(DOMAIN, t) or re.search(IP + r"(?!\))", t)) for t in texts) > len(texts) / 5


def test_prompts_are_short(records):
    # ~4 characters per BPE token on this kind of text: 1000 characters is ~250 tokens.
    lengths = sorted(len(r["messages"][1]["content"]) for r in records)
    assert lengths[len(lengths) // 2] < 700 and lengths[-1] < 1400


def test_short_logs_follow_the_same_rules():
    """The pretrained demo's shorter auth logs: at most 6 lines, the same verdict rules, every label."""
    short = domain.generate(600, seed=0, short=True)
    for r in short:
        prompt, answer = r["messages"][1]["content"], r["messages"][2]["content"]
        assert solve(r["task"], prompt) == answer, prompt
    auth = [r for r in _base(short) if r["task"] == "auth_triage"]
    line = r"^(?:\d\d:\d\d:\d\d )?(?:sshd|GET|POST) "
    logs = [re.findall(line, r["messages"][1]["content"], re.M) for r in auth]
    assert not any(re.search(r"\d\d:\d\d:\d\d", r["messages"][1]["content"]) for r in auth)
    longest = max(
        len(re.findall(line, r["messages"][1]["content"], re.M))
        for r in domain.generate(600, seed=0)
        if r["task"] == "auth_triage"
    )
    assert max(map(len, logs)) <= 6 < longest
    assert Counter(r["messages"][2]["content"] for r in auth).keys() == set(domain.VERDICTS)


def test_pii_planted_in_the_expected_fraction(records):
    base = _base(records)
    frac = sum(bool(r["meta"]["pii"]) for r in base) / len(base)
    assert 0.25 < frac < 0.35
    kinds = Counter(t for r in base for t in r["meta"]["pii"])
    assert {"EMAIL", "PHONE", "CREDIT_CARD", "AWS_ACCESS_KEY", "JWT", "SECRET_ASSIGNMENT"} <= set(kinds)
    for r in base:
        text = r["messages"][1]["content"]
        if "CREDIT_CARD" in r["meta"]["pii"]:
            digits = re.search(r"\b\d{4} \d{4} \d{4} \d{4}\b", text).group().replace(" ", "")
            assert luhn_digit(digits[:-1]) == int(digits[-1])
        if "JWT" in r["meta"]["pii"]:
            assert re.search(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]{43}\b", text)
        if "AWS_ACCESS_KEY" in r["meta"]["pii"]:
            assert re.search(r"\bAKIA[A-Z2-7]{16}\b", text)


def test_pii_found_by_the_project_scanner(records):
    pii = pytest.importorskip("yunque.data.pii", reason="yunque.data.pii lives on the data branch until merged")
    missed = Counter()
    for r in _base(records)[:600]:
        found = {f.type for f in pii.scan(r["messages"][1]["content"])}
        missed.update(set(r["meta"]["pii"]) - found)
    assert not missed, missed


def test_planted_duplicates(records):
    keys = Counter(json.dumps(r["messages"]) for r in records)
    assert sum(v - 1 for v in keys.values()) == sum("duplicate_of" in r["meta"] for r in records) == 90
    near = [r for r in records if "near_duplicate_of" in r["meta"]]
    assert len(near) == 90
    base = _base(records)
    for r in near[:20]:
        src = base_text = None
        for b in base:
            if r["messages"][1]["content"].startswith(b["messages"][1]["content"] + "\n"):
                src, base_text = b, b["messages"][1]["content"]
        assert src is not None and src["messages"][2] == r["messages"][2] and len(base_text) > 50


def test_bad_sizes_are_config_errors():
    from yunque.errors import ConfigError

    with pytest.raises(ConfigError, match="at least"):
        domain.generate(3)
    with pytest.raises(ConfigError, match="pii_fraction"):
        domain.generate(100, pii_fraction=1.5)


def test_answers_match_is_exact_up_to_case_and_space():
    assert domain.answers_match(" Phishing\n", "phishing")
    assert domain.answers_match("Command-and-Control ", "command-and-control")
    assert not domain.answers_match("command and control", "command-and-control")


# --- corpus ------------------------------------------------------------------------------


def _fake_stdlib(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "os.py").write_text('"""Operating system interfaces for everyone."""\nimport sys\n')
    (root / "pkg" / "mod.py").write_text(
        "#!/usr/bin/env python3\n# -*- coding: utf-8 -*-\n"
        '"""A module docstring with several words.\n\n    Indented detail line.\n"""\n'
        "# Why this constant: it is the answer\n# to everything, said the book.\n"
        "ANSWER = 42\n\n\f\n"
        "class Thing:\n"
        '    """One thing, documented well."""\n'
        "    def f(self):  # an inline comment stays in the code\n"
        '        """Operating system interfaces for everyone."""\n'
        "        return 1\n"
        'def g(): "Short one-line docstring on the def line here."; return 2\n'
    )
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text('"""Test docstrings are skipped entirely here."""\n')
    (root / "README.txt").write_text("Read me\n\n\nplease.\n")
    return root


def test_corpus_extraction_on_a_small_tree(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    info = corpus.build_corpus(tmp_path / "out", root=root, min_bytes=0, workers=1)
    docs = list(corpus.read_corpus(tmp_path / "out"))
    assert info.documents == len(docs)
    by = {(k, s): t for k, s, t in docs}
    assert by[("text", "README.txt:1")] == "Read me\nplease."
    assert by[("docstring", "pkg/mod.py:3")] == "A module docstring with several words.\nIndented detail line."
    assert by[("comment", "pkg/mod.py:7")] == "Why this constant: it is the answer\nto everything, said the book."
    assert by[("docstring", "pkg/mod.py:13")] == "One thing, documented well."
    assert ("docstring", "pkg/mod.py:15") not in by  # same text as os.py's docstring: kept once
    assert info.duplicates_dropped == 1
    code = by[("code", "pkg/mod.py:1")]
    assert "ANSWER = 42" in code and "# an inline comment stays" in code and 'def g(): "Short' in code
    assert '"""' not in code and "Why this constant" not in code and "coding" not in code
    assert not any("Test docstrings" in t for t in by.values())
    assert all("\n\n" not in t for t in by.values())
    with pytest.raises(DataError, match="need 1,000"):
        corpus.build_corpus(tmp_path / "out2", root=root, min_bytes=1000, workers=1)
    with pytest.raises(DataError, match="not a Python standard library"):
        corpus.build_corpus(tmp_path / "out3", root=tmp_path / "out", min_bytes=0)


def test_corpus_build_reports_progress_while_parsing(tmp_path, monkeypatch):
    root = _fake_stdlib(tmp_path / "lib")
    quiet = corpus.build_corpus(tmp_path / "a", root=root, min_bytes=0, workers=1)
    monkeypatch.setattr(corpus, "PROGRESS_EVERY_S", 0.0)  # every module is "slow"
    lines: list[str] = []
    info = corpus.build_corpus(tmp_path / "b", root=root, min_bytes=0, workers=1, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("parsed 1/2 stdlib modules | ") and "eta" in lines[0]
    assert info.sha256 == quiet.sha256  # only printing changes


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    before = set(sys.modules)
    info = corpus.build_corpus(out, workers=2)
    return out, info, set(sys.modules) - before


def test_stdlib_corpus_is_big_offline_traceable_and_imports_nothing(stdlib_corpus):
    out, a, imported = stdlib_corpus
    assert a.bytes >= 5_000_000 and a.documents > 5000
    assert a.sha256 == hashlib.sha256((out / "corpus.txt").read_bytes()).hexdigest()
    assert not {"antigravity", "this", "turtle", "idlelib", "tkinter"} & imported
    assert set(a.per_kind) == set(corpus.KINDS) and all(v["bytes"] > 100_000 for v in a.per_kind.values())
    # Provenance: a document's source line really holds its start.
    root = corpus.stdlib_dir()
    for kind, source, text in list(corpus.read_corpus(out))[::997]:
        if kind in ("docstring", "comment"):
            path, line = source.rsplit(":", 1)
            src = (root / path).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").split("\n")
            first_words = text.split("\n")[0].split()[:3]
            assert all(w in "\n".join(src[int(line) - 1 : int(line) + 3]) for w in first_words), (source, text[:80])
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["sha256"] == a.sha256 and meta["python"] == sys.version.split()[0]


@pytest.mark.slow
def test_stdlib_corpus_bytes_do_not_depend_on_parallelism(stdlib_corpus, tmp_path):
    out, a, _ = stdlib_corpus
    b = corpus.build_corpus(tmp_path, workers=1)
    assert b.sha256 == a.sha256
    assert (tmp_path / "corpus.sources.tsv").read_bytes() == (out / "corpus.sources.tsv").read_bytes()
