"""Strict config loading: every mistake is an error naming the key (and file:line when from YAML)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from yunque.config import load_config, to_dict
from yunque.errors import ConfigError


@dataclass
class Inner:
    r: int = field(default=8, metadata={"gt": 0})
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    lr: float = field(default=1e-3, metadata={"gt": 0})
    name: str = "x"
    steps: int = 10
    flags: list[str] = field(default_factory=list)
    out: Path = Path("runs")
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None


def test_defaults_file_and_overrides_layer(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-2\ninner:\n  r: 4\n")
    cfg = load_config(Outer, f, ["inner.kind=b", "steps=3", "flags=[a, b]"])
    assert (cfg.lr, cfg.inner.r, cfg.inner.kind, cfg.steps, cfg.flags, cfg.out) == (
        0.01,
        4,
        "b",
        3,
        ["a", "b"],
        Path("runs"),
    )
    assert to_dict(cfg)["out"] == "runs"


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("lr: 0.01\nlearning_rate: 3\n", "c.yaml:2: learning_rate: unknown key"),
        ("steps: ten\n", "c.yaml:1: steps: expected an integer, got 'ten'"),
        ("lr: -1\n", "c.yaml:1: lr: must be > 0, got -1.0"),
        ("inner:\n  r: 0\n", "c.yaml:2: inner.r: must be > 0, got 0"),
        ("inner:\n  kind: c\n", "inner.kind: expected one of 'a' | 'b', got 'c'"),
        ("maybe:\n  r: -2\n", "maybe.r: must be > 0, got -2"),
        ("steps: true\n", "steps: expected an integer, got True"),
        ("lr: 1e-4x\n", "lr: expected a number, got '1e-4x'"),
        ("lr: [1\n", "c.yaml:2: invalid YAML"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, yaml_text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(Outer, f)
    assert needle in str(e.value), str(e.value)


def test_override_errors_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="override 'lr': expected key=value"):
        load_config(Outer, None, ["lr"])
    with pytest.raises(ConfigError, match="inner.rr: unknown key"):
        load_config(Outer, None, ["inner.rr=3"])
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
