"""The command line end to end: tokenizer train -> init -> inspect -> generate, and its errors."""

import hashlib

import pytest
from tok_helpers import write_corpus

from yunque.__main__ import COMMANDS, PASSTHROUGH, main
from yunque.generate import Sampling, generate
from yunque.inference import load


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(d / "corpus.txt", n_lines=800)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "600", "--out", str(d / "tok")]) == 0
    assert main(["init", str(d / "m"), "--preset", "tiny", "--tokenizer", str(d / "tok"), "--seed", "3"]) == 0
    return d / "m"


def test_inspect_prints_hashes(model_dir, capsys):
    assert main(["inspect", str(model_dir)]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert "LlamaForCausalLM" in out and digest in out and "tokenizer.json" in out


def test_generate_prints_the_api_completion(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "the quick", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model, tok = load(model_dir)
    ids = generate(
        model,
        [tok.encode("the quick", add_special_tokens=True)],
        Sampling(max_new_tokens=12, stop_ids=tok.stop_ids),
        pad_id=tok.pad_id,
    )[0]
    ids = [i for i in ids if i not in tok.stop_ids]
    assert printed == tok.decode(ids, skip_special_tokens=True)


def test_generate_chat_and_seeded_sampling(model_dir, capsys):
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "hola",
        "--chat",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.8",
        "--seed",
        "7",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--model", "/nonexistent", "--prompt", "x"], "/nonexistent: model directory not found"),
        (["generate", "--model", "{m}", "--prompt", "x", "--top-p", "1.5"], "--top-p 1.5 is out of range"),
        (["init", "{m}-2", "--preset", "huge"], "--preset 'huge' is unknown"),
    ],
)
def test_user_errors_are_one_line_exit_2(model_dir, capsys, argv, needle):
    argv = [a.replace("{m}", str(model_dir)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_chat_streams_and_keeps_history(model_dir):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "yunque",
            "chat",
            "--model",
            str(model_dir),
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ],
        input="hello\nand again\n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2 and r.stdout.count("you> ") == 3


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - PASSTHROUGH))  # passthrough help is the other tool's
def test_every_command_has_working_help(command, capsys):
    """`--help` of every registered command (help texts come from docstrings, which may hold a '%')."""
    assert main([*command.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: yunque {command}") and "--help" in out


def test_percent_in_a_docstring_is_printed_as_is(capsys):
    from yunque.cli import build_parser

    def cmd(rate: float = 0.5, *, out: str) -> int:
        """Do it.

        Args:
            rate: share of records, 1% by default (100% keeps all)
            out: where; %(prog)s is not expanded here
        """
        return 0

    text = build_parser(cmd, "yunque x").format_help()
    assert "1% by default (100% keeps all) (default: 0.5)" in text and "%(prog)s is not expanded" in text


def test_positionals_may_follow_flags():
    """`yunque train c.yaml --dry-run optim.lr=1e-4`, `yunque data prepare in.jsonl --out d pii.modes.email=keep`."""
    from yunque.cli import call_with_argv

    def cmd(config: str, *overrides: str, dry_run: bool = False, out: str | None = None) -> tuple:
        return config, overrides, dry_run, out

    got = call_with_argv(cmd, ["c.yaml", "--dry-run", "a.b=1", "--out", "d", "c=2"], "yunque x")
    assert got == ("c.yaml", ("a.b=1", "c=2"), True, "d")
