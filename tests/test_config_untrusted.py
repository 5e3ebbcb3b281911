"""YAML configs from anywhere: tags, nesting, alias bombs, duplicate keys and bad bytes are one
ConfigError naming the file (and line), never a traceback or an endless walk (issue 24 item 10)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from yunque.config import load_config
from yunque.errors import ConfigError


@dataclass
class Inner:
    x: int = 1


@dataclass
class Cfg:
    lr: float = 0.1
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, Any] = field(default_factory=dict)


def _alias_bomb(levels: int = 12) -> str:
    s = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels):
        s += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return s + f"extra: {{k: *a{levels - 1}}}\n"


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            'lr: !!python/object/apply:os.system ["echo pwned"]\n',
            r"cfg.yaml:1: invalid YAML: could not determine a constructor",
        ),
        ("lr: !custom 1\n", r"cfg.yaml:1: invalid YAML: could not determine a constructor for the tag '!custom'"),
        ("extra: " + "[" * 20000 + "]" * 20000 + "\n", r"cfg.yaml(:1)?: invalid YAML: nested too deeply"),
        ("extra: " + "{a: " * 100 + "1" + "}" * 100 + "\n", r"cfg.yaml:1: invalid YAML: nested too deeply"),
        (_alias_bomb(), r"cfg.yaml:\d+: invalid YAML: more than 100,000 values"),
        ("lr: 0.1\nlr: 0.2\n", r"cfg.yaml:2: lr: key given twice"),
        ("inner:\n  x: 1\n  x: 2\n", r"cfg.yaml:3: inner.x: key given twice"),
        ("lr: [1, 2\n", r"cfg.yaml:2: invalid YAML"),
        ("extra: {a: " + "9" * 5000 + "}\n", r"cfg.yaml: invalid YAML: Exceeds the limit"),
    ],
)
def test_hostile_yaml_is_one_error(tmp_path, text, needle):
    p = tmp_path / "cfg.yaml"
    p.write_text(text, encoding="utf-8")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(Cfg, p)
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)


def test_invalid_utf8_names_the_file(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_bytes(b'lr: 0.1\nextra: {a: "\xff\xfe"}\n')
    with pytest.raises(ConfigError, match=r"cfg.yaml: not UTF-8 text \(byte 20\)"):
        load_config(Cfg, p)


def test_deep_override_is_one_error():
    with pytest.raises(ConfigError, match="override extra: value nested too deeply"):
        load_config(Cfg, None, ["extra=" + "[" * 20000 + "]" * 20000])


def test_anchors_within_reason_still_work(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("extra: {one: &b {k: 1}, two: *b}\nlr: 1e-3\n", encoding="utf-8")
    cfg = load_config(Cfg, p)
    assert cfg.extra == {"one": {"k": 1}, "two": {"k": 1}} and cfg.lr == 1e-3


@pytest.mark.parametrize(
    "cls_path, key",
    [
        ("yunque.train.config:TrainConfig", "seed"),
        ("yunque.data.config:DataConfig", "split.seed"),
        ("yunque.data.config:DataConfig", "dedup.seed"),
    ],
)
def test_seeds_stay_in_the_range_the_generators_take(cls_path, key):
    import importlib

    mod, name = cls_path.split(":")
    cls = getattr(importlib.import_module(mod), name)
    for bad in (2**40, -1):
        with pytest.raises(ConfigError, match=rf"{key}: must be"):
            load_config(cls, None, [f"{key}={bad}"])


def test_an_override_too_long_to_be_a_number_is_a_type_error():
    with pytest.raises(ConfigError, match="lr: expected a number"):
        load_config(Cfg, None, ["lr=" + "9" * 5000])


@pytest.mark.parametrize("value", ["a/" + "x" * 300, "y" * 5000, "nul\x00byte"])
def test_unusable_paths_are_config_errors(value):
    from yunque.train.config import TrainConfig

    with pytest.raises(ConfigError, match="tokenizer: not a usable path"):
        from yunque.config import from_dict

        from_dict(TrainConfig, {"tokenizer": value})
