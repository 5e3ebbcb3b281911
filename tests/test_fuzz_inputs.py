"""Every reader, fed mutated and truncated files through the real CLI, ends in exit 0 or in exit 2 with
one line `error: ...`: no traceback, no hang, memory bounded (issue 24 item 10).

The harness (tests/helpers/fuzzing.py) runs in a child process under an address-space limit, so an
allocation bomb fails there instead of exhausting this machine; each case has its own time limit.
YUNQUE_FUZZ_CASES sets the number of cases (default 120, about 40 s); run the harness directly
for larger campaigns.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from yunque.__main__ import main

HARNESS = Path(__file__).parent / "helpers" / "fuzzing.py"
ADDRESS_SPACE = 8 << 30  # torch maps ~2 GiB of libraries; a bomb would ask for far more


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_fuzzed_inputs_end_in_one_line_errors(tmp_path):
    cases = int(os.environ.get("YUNQUE_FUZZ_CASES", "120"))
    out = tmp_path / "results.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            "--cases",
            str(cases),
            "--seed",
            "24",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_memory,
        timeout=60 + 15 * cases,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()][1:]
    assert len(rows) == cases
    readers = {row["reader"] for row in rows}
    assert len(readers) >= 25  # config.json, tokenizer files, safetensors, shard index, YAML, data inputs, templates...
    bad = [row for row in rows if not row["ok"]]
    assert not bad, "\n\n".join(
        f"{b['reader']} ({b['argv']}): rc {b['rc']}\n{b['escaped'] or b['stderr_tail']}" for b in bad
    )
    assert sum(row["rc"] == 2 for row in rows) > cases // 2  # the mutations bite: most cases are refused
    assert max(row["seconds"] for row in rows) < 20
    assert rows[-1]["maxrss_mb"] < 3000


@pytest.fixture
def model_with_template(tmp_path):
    import torch

    from yunque.formats.hf import save_model
    from yunque.model import ModelConfig, Transformer
    from yunque.tokenizer import train_bpe

    (tmp_path / "c.txt").write_text("the cat sat on the mat\n" * 200)
    tok = train_bpe([tmp_path / "c.txt"], 280, tmp_path / "m")
    torch.manual_seed(0)
    save_model(
        Transformer(
            ModelConfig(
                vocab_size=tok.vocab_size,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=64,
            )
        ),
        tmp_path / "m",
    )
    return tmp_path / "m"


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_template_that_renders_nothing_is_one_error(model_with_template, capsys):
    (model_with_template / "chat_template.jinja").write_text("{% if false %}x{% endif %}")
    err = _one_line_error(capsys, ["generate", "--model", str(model_with_template), "--prompt", "hi", "--chat"])
    assert "chat template that rendered nothing" in err


def test_a_prompt_past_the_context_is_refused_before_allocation(model_with_template, capsys):
    (model_with_template / "chat_template.jinja").write_text("{{ 'the cat ' * 100000 }}")
    err = _one_line_error(capsys, ["generate", "--model", str(model_with_template), "--prompt", "hi", "--chat"])
    assert "exceeds the model's context of 64 tokens" in err
    err = _one_line_error(
        capsys, ["generate", "--model", str(model_with_template), "--prompt", "hi", "--max-new-tokens", "1000000000"]
    )
    assert "max_new_tokens 1000000000 exceeds" in err


def test_last_resort_net_names_the_command(monkeypatch, capsys):
    import yunque.recipes.inspect as rec

    def boom(path: str):
        def f(n):
            return f(n + 1)

        f(0)

    monkeypatch.setattr(rec, "inspect_cmd", boom)
    assert "yunque inspect: an input is nested too deeply" in _one_line_error(capsys, ["inspect", "x"])

    def bad_bytes(path: str):
        b"\xff".decode("utf-8")

    monkeypatch.setattr(rec, "inspect_cmd", bad_bytes)
    assert "yunque inspect: an input is not valid UTF-8" in _one_line_error(capsys, ["inspect", "x"])
