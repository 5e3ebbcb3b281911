"""Optional packages: a command that needs one outside the default install says in one line which extra brings it."""

import sys

import pytest

from yunque.__main__ import main
from yunque.errors import MissingExtraError, require


def test_require_names_the_extra_and_the_missing_module(monkeypatch):
    assert require("json", "x", "y") is sys.modules["json"]
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtraError) as e:
        require("lm_eval", "lmeval", "yunque lm-eval", package="lm-eval")
    assert str(e.value) == (
        "yunque lm-eval needs the optional package lm-eval (no module named 'lm_eval'): "
        "pip install 'yunque[lmeval]' (in a clone: bash install.sh lmeval)"
    )
    assert e.value.exit_code == 2


def test_chat_url_needs_no_optional_package_and_names_an_unreachable_server(monkeypatch, capsys):
    for name in ("openai", "httpx"):
        monkeypatch.setitem(sys.modules, name, None)  # importing either now fails, as if not installed
    assert main(["chat", "--url", "http://127.0.0.1:9", "--api-key", "k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "127.0.0.1:9" in err[0], err
