"""The PII policy of `data prepare`: per-type defaults, any spelling of a type or a mode, YAML's
bare `off`, and `key=value` settings on the command line as `train` takes them."""

from __future__ import annotations

import json

import pytest
from datahelp import all_records, cfg, write_jsonl

from yunque.config import load_config
from yunque.data.config import PII_DEFAULTS, DataConfig, PIIConfig
from yunque.data.pii import PII_TYPES
from yunque.data.pipeline import prepare
from yunque.errors import ConfigError

QUIET = {"log": lambda *_: None}
SENDER = "billing@paypa1-secure.example"  # a phishing sender: the evidence the record is about
IP = "203.0.113.77"
KEY = "AKIAIOSFODNN7EXAMPLE"
ROWS = [
    {"text": f"From: {SENDER}\nSubject: verify your account now"},
    {"text": f"sshd: 40 failed logins for root from {IP} in 60 s"},
    {"text": f"deploy log: aws_access_key_id = {KEY}"},
]


def _texts(out) -> str:
    return json.dumps(all_records(out))


def test_defaults_keep_ips_redact_people_and_secrets(tmp_path):
    r = prepare([write_jsonl(tmp_path / "in.jsonl", ROWS)], tmp_path / "out", cfg(), **QUIET)
    text = _texts(tmp_path / "out")
    assert IP in text  # kept: what the log record is about
    assert SENDER not in text and "[EMAIL]" in text and KEY not in text and "[AWS_ACCESS_KEY]" in text
    assert r.report["pii_findings"] == {"AWS_ACCESS_KEY": 1, "EMAIL": 1, "IPV4": 1}  # IPs still counted
    assert r.report["pii_modes"]["IPV4"] == "report" and r.report["pii_modes"]["EMAIL"] == "redact"
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| IPV4 | 1 | kept, counted |" in md and "| EMAIL | 1 | redacted |" in md and "pii.modes.email=keep" in md
    assert sorted(PII_DEFAULTS) == sorted(PII_TYPES)  # every type has a default, with its reason
    assert {t for t, m in PII_DEFAULTS.items() if m != "redact"} == {"IPV4", "IPV6"}


def test_yaml_bare_off_lower_case_types_and_any_case_modes(tmp_path):
    (tmp_path / "data.yaml").write_text(
        "workers: 1\npii:\n  modes:\n    email: off\n    Ipv4: REDACT\n    aws-access-key: Drop\n", encoding="utf-8"
    )
    c = load_config(DataConfig, tmp_path / "data.yaml")
    assert c.pii.modes == {"EMAIL": "keep", "IPV4": "redact", "AWS_ACCESS_KEY": "drop"}
    r = prepare([write_jsonl(tmp_path / "in.jsonl", ROWS)], tmp_path / "out", c, **QUIET)
    text = _texts(tmp_path / "out")
    assert SENDER in text and IP not in text and "[IPV4]" in text and r.dropped == {"pii_drop": 1}
    assert "EMAIL" not in r.report["pii_findings"]  # keep: not even scanned


@pytest.mark.parametrize("value", ["keep", "off", "OFF", "false", "False", "no", "Keep"])
def test_every_spelling_of_keep_on_the_command_line(value):
    c = load_config(DataConfig, None, [f"pii.modes.email={value}"])
    assert c.pii.effective()["EMAIL"] == "keep"


def test_default_mode_applies_to_every_type_not_named():
    c = PIIConfig(default_mode="Report", modes={"jwt": "redact"})
    modes = c.effective()
    assert modes["JWT"] == "redact" and modes["EMAIL"] == modes["IPV4"] == modes["PRIVATE_KEY"] == "report"
    assert PIIConfig(default_mode=False).effective()["EMAIL"] == "keep"


def test_bad_type_or_mode_names_the_key_and_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("pii:\n  modes:\n    email: hide\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"bad\.yaml:3: pii\.modes\.email: expected one of redact, drop, report, keep"
    ):
        load_config(DataConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"pii\.modes\.emails: unknown type 'emails'; known: EMAIL"):
        load_config(DataConfig, None, ["pii.modes.emails=keep"])


def _main(argv, capsys):
    from yunque.__main__ import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_takes_key_value_settings_after_the_inputs(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    code, so, se = _main(
        [
            "data",
            "prepare",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "pii.modes.email=keep",
            "--workers",
            "1",
            "pii.modes.ipv4=redact",
            "split.seed=5",
        ],
        capsys,
    )
    assert code == 0, se
    text = _texts(tmp_path / "out")
    assert SENDER in text and IP not in text
    assert (
        "PII and secrets found: AWS_ACCESS_KEY 1 (redacted), IPV4 1 (redacted)" in so and "pii.modes.email=keep" in so
    )
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["split"]["seed"] == 5
    code, _, se = _main(["data", "prepare", str(src), "--out", str(tmp_path / "o2"), "pii.modes.email=hide"], capsys)
    assert code == 2 and se.startswith("error: pii.modes.email: expected one of") and "Traceback" not in se
    code, _, se = _main(["data", "prepare", "split.seed=5", "--out", str(tmp_path / "o3")], capsys)
    assert code == 2 and "no input given" in se
