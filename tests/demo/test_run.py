"""The demo recipe: its pieces fast, and the whole quick run end to end (slow)."""

from __future__ import annotations

import json
import shlex

import pytest

from yunque.demo import corpus, domain, report, scoring
from yunque.demo.run import QUICK, pretraining_text


def _chat(task: str, user: str, answer: str) -> dict:
    return {
        "kind": "chat",
        "messages": [
            {"role": "system", "content": domain.SYSTEM[task]},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
    }


def test_pretraining_text_has_prompts_but_never_answers(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    (root / "os.py").write_text('"""Operating system interfaces, documented here."""\n')
    corpus.build_corpus(tmp_path / "c", root=root, min_bytes=0, workers=1)
    train = [
        _chat("phishing", "From: X <a@b.com>\nSubject: hi\n\nbody text", "legitimate"),
        _chat("auth_triage", "Auth log from db02:\n10:00:00 sshd: Failed password for root from 192.0.2.1", "benign"),
    ]
    rows = pretraining_text(tmp_path / "c", train, 10_000, seed=0)
    texts = [r["text"] for r in rows]
    assert all(r["kind"] == "text" for r in rows)
    assert "Operating system interfaces, documented here." in texts
    assert train[0]["messages"][1]["content"] in texts and train[1]["messages"][1]["content"] in texts
    assert not any(t in ("legitimate", "benign") or domain.SYSTEM["phishing"] in t for t in texts)
    assert rows == pretraining_text(tmp_path / "c", train, 10_000, seed=0)


def test_task_scores_are_exact_per_task():
    recs = [
        _chat("phishing", "m1", "phishing"),
        _chat("phishing", "m2", "legitimate"),
        _chat("auth_triage", "log", "scan"),
    ]
    s = scoring.task_scores(recs, ["Phishing", "phishing", "Scan "])
    assert s["all"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(200 / 3)}
    assert s["phishing"]["accuracy"] == 50.0 and s["auth_triage"]["accuracy"] == 100.0
    with pytest.raises(ValueError):
        scoring.task_scores(recs, ["phishing"])  # one prediction per record, never silently fewer


def test_summary_rows(tmp_path):
    tasks = {"all": {"n": 4, "correct": 3, "accuracy": 75.0}, "phishing": {"n": 4, "correct": 3, "accuracy": 75.0}}
    ev = {
        name: {"tasks": tasks, "metrics": {"exact_match": 75.0, "rougeL": 80.0, "perplexity": 1.5}}
        for name in ("base", "fine-tuned")
    }
    rows = report.accuracy_rows(ev)
    assert rows[0] == ("task accuracy (all)", "", "75.0%", "75.0%")
    assert ("  phishing (n=4)", "50.0%", "75.0%", "75.0%") in rows


def _venv(root):
    b = root / ".venv" / "bin"
    b.mkdir(parents=True)
    for name in ("python", "yunque", "activate"):
        (b / name).write_text("")
    return b


def test_cli_command_is_the_running_executable(tmp_path):
    """After `bash install.sh` the script is .venv/bin/yunque, not on PATH: print that, and how to activate."""
    b = _venv(tmp_path)
    cwd, none = str(tmp_path), lambda name: None
    assert report.cli_command(".venv/bin/yunque", str(b / "python"), cwd, none) == (
        ".venv/bin/yunque",
        ".venv/bin/activate",
    )
    # python -m yunque: the script beside the running python
    main = str(tmp_path / "src" / "yunque" / "__main__.py")
    assert report.cli_command(main, str(b / "python"), cwd, none)[0] == ".venv/bin/yunque"
    # run from elsewhere: absolute paths
    elsewhere = str(tmp_path / "elsewhere")
    assert report.cli_command(str(b / "yunque"), str(b / "python"), elsewhere, none) == (
        str(b / "yunque"),
        str(b / "activate"),
    )
    # the venv is active (its script is the `yunque` on PATH): plain `yunque`
    on_path = {"yunque": str(b / "yunque")}.get
    assert report.cli_command(".venv/bin/yunque", str(b / "python"), cwd, on_path) == ("yunque", None)
    # a Python with no yunque script beside it: `python -m yunque` through that very Python
    py = tmp_path / "py dir" / "python3"
    py.parent.mkdir()
    assert report.cli_command(main, str(py), cwd, none) == ("'py dir/python3' -m yunque", None)
    assert report.cli_command(main, str(py), cwd, {"python": str(py)}.get) == ("python -m yunque", None)
    # the script in the current folder itself still runs as a path, never a PATH search
    assert report.cli_command("yunque", str(b / "python"), str(b), none)[0] == "./yunque"


def test_next_commands_run_and_create_a_key_before_serving(tmp_path):
    from yunque.__main__ import COMMANDS

    cli, activate = report.cli_command()  # how this test process would run yunque
    cmds = report.next_commands(tmp_path / "my run", cli)
    names = []
    for cmd in cmds:
        argv = shlex.split(cmd, comments=True)  # every printed command must be valid shell
        assert argv[: len(shlex.split(cli))] == shlex.split(cli)
        rest = argv[len(shlex.split(cli)) :]
        names.append(next(k for k in sorted(COMMANDS, key=len, reverse=True) if rest[: len(k.split())] == k.split()))
        if "--model" in rest:  # paths with spaces are quoted
            assert rest[rest.index("--model") + 1] == str(tmp_path / "my run" / "model")
    assert names.index("keys create") < names.index("serve")
    # the printed prefix really starts yunque, and the key command it names exists
    import subprocess

    r = subprocess.run([*shlex.split(cli), "keys", "create", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--name" in r.stdout
    assert "source .venv/bin/activate" in report.next_steps_note(".venv/bin/yunque", ".venv/bin/activate")


def test_evaluation_stage_reports_progress(tmp_path, monkeypatch):
    from eval_helpers import cached_model_dir

    from yunque.evaluate import runner

    model = cached_model_dir("llama")
    test = tmp_path / "test.jsonl"
    recs = [
        _chat("phishing", "From: X <a@b.com>\n\nhi", "legitimate"),
        _chat("phishing", "From: Y\n\npay", "phishing"),
        _chat("auth_triage", "10:00:00 sshd: Failed password for root", "brute-force"),
    ]
    test.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    quiet = scoring.evaluate_pair(model, model, test, tmp_path / "q", batch_size=1)
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)  # every batch is "slow"
    lines: list[str] = []
    ev = scoring.evaluate_pair(model, model, test, tmp_path / "e", batch_size=1, log=lines.append)
    for name in ("base", "fine-tuned"):
        i = lines.index(f"      {name} model: 3 test examples in 2 tasks")
        assert lines[i + 1].startswith(f"      {name}, auth_triage: generated 1/1 examples in ")
        assert lines[i + 2].startswith(f"      {name}, phishing: generated 1/2 examples | ") and "eta" in lines[i + 2]
        assert lines[i + 3].startswith(f"      {name}, phishing: generated 2/2 examples in ")
    assert len(lines) == 8
    for name in ("base", "fine-tuned"):  # only printing changes
        assert {k: v for k, v in ev[name].items() if k != "timing"} == {
            k: v for k, v in quiet[name].items() if k != "timing"
        }


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    from yunque.demo.run import run_demo

    lines: list[str] = []
    r = run_demo(tmp_path / "demo", quick=True, seed=0, log=lines.append)
    out = r.out_dir
    for rel in (
        "report.md",
        "run.json",
        "accuracy.png",
        "pretrain_loss.png",
        "finetune_loss.png",
        "model/config.json",
        "data/manifest.json",
        "eval/fine-tuned.jsonl",
        "corpus/corpus.sources.tsv",
    ):
        assert (out / rel).is_file(), rel
    run = json.loads((out / "run.json").read_text())
    ev = run["eval"]
    n = ev["fine-tuned"]["examples"]
    assert n == QUICK.test_limit and sum(ev["fine-tuned"]["tasks"][t]["n"] for t in domain.TASKS) == n
    assert (
        run["prepare"]["pii_findings"].get("EMAIL", 0) > 0 and run["prepare"]["dropped"].get("exact_duplicate", 0) > 0
    )
    assert len(run["files_sha256"]["model/model.safetensors"]) == 64
    md = (out / "report.md").read_text()
    assert "base vs fine-tuned" in md and "| task accuracy (all) |" in md
    assert any("fine-tuned task accuracy" in line for line in lines)
    # Even the quick run learns the tasks, and says so against its own bar.
    tuned, base = ev["fine-tuned"]["tasks"]["all"]["accuracy"], ev["base"]["tasks"]["all"]["accuracy"]
    # Phishing (13 test records, chance 50%) measured 92%; 75% leaves two records for other CPUs' rounding.
    assert tuned >= QUICK.accuracy_bar > base and run["eval"]["fine-tuned"]["tasks"]["phishing"]["accuracy"] >= 75
    assert ev["fine-tuned"]["metrics"]["perplexity"] < ev["base"]["metrics"]["perplexity"]
    assert any(f"meets the {QUICK.accuracy_bar:.0f}% bar" in line for line in lines)
    print(f"quick demo: base {base:.1f}% -> fine-tuned {tuned:.1f}% in {r.seconds:.0f} s")
