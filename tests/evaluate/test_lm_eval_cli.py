"""`yunque lm-eval ARGS`: lm-eval's own command line with the `yunque` model registered in-process.

lm-eval <= 0.4.13 reads no plugin entry points, so this command is the documented way to run
`--model yunque`. Checked three ways: without lm-eval it says in one line which extra to install;
it hands lm-eval every argument with the model registered; the real command gives the numbers of
the in-process adapter.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import cached_model_dir
from lm_eval_tasks import TASKS, task_dir

from yunque.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_without_lm_eval_one_line_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if not installed
    assert main(["lm-eval", "--model", "yunque", "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "lm-eval" in err and "pip install 'yunque[lmeval]'" in err and "bash install.sh lmeval" in err


def test_hands_lm_eval_its_arguments_with_the_model_registered(monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'yunque[lmeval]')")
    import lm_eval.__main__
    from lm_eval.api.registry import get_model

    seen = {}

    def cli_evaluate():
        seen["argv"] = list(sys.argv)
        seen["model"] = get_model("yunque")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", cli_evaluate)
    argv_before = list(sys.argv)
    assert main(["lm-eval", "--model", "yunque", "--tasks", "x,y"]) == 0
    assert seen["argv"] == ["lm_eval", "--model", "yunque", "--tasks", "x,y"]
    assert f"{seen['model'].__module__}:{seen['model'].__qualname__}" == "yunque.evaluate.lm_eval_adapter:YunqueLM"
    assert sys.argv == argv_before  # the caller's argv is restored


@pytest.mark.slow  # the real CLI indexes lm-eval's ~14k built-in task files first (~15 s CPU)
def test_yunque_lm_eval_command_matches_the_adapter(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'yunque[lmeval]')")
    model_dir = cached_model_dir("llama-gqa")
    tasks = task_dir(tmp_path)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "yunque",
            "lm-eval",
            "--model",
            "yunque",
            "--model_args",
            f"pretrained={model_dir},max_length=64",
            "--tasks",
            ",".join(TASKS),
            "--include_path",
            str(tasks),
            "--batch_size",
            "2",
            "--device",
            "cpu",
            "--seed",
            "0,0,0,0",
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    cli = json.loads(results_file.read_text(encoding="utf-8"))["results"]

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import yunque.evaluate.lm_eval_adapter  # noqa: F401  (registers "yunque" in this process)

    ref = simple_evaluate(
        model="yunque",
        model_args=f"pretrained={model_dir},max_length=64",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=2,
        device="cpu",
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )["results"]
    compared = 0
    for task in TASKS:
        for key, v in ref[task].items():
            if isinstance(v, float) and not key.endswith("_stderr,none") and math.isfinite(v):
                assert cli[task][key] == pytest.approx(v, rel=1e-6, abs=1e-9), (task, key)
                compared += 1
    assert compared >= 6  # acc, acc_norm, three perplexities, exact_match


def test_the_documented_command_line_builds_the_model(monkeypatch):
    """The adapter's docstring shows the command to run; lm-eval 0.4.13 passes `--batch_size` to
    the model itself, so a `batch_size` inside `--model_args` failed with "multiple values"."""
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'yunque[lmeval]')")
    import shlex

    from lm_eval.config.evaluate_config import EvaluatorConfig

    import yunque.evaluate.lm_eval_adapter as adapter

    line = next(ln.strip() for ln in adapter.__doc__.splitlines() if ln.strip().startswith("yunque lm-eval"))
    argv = [a.replace("runs/sft/model", str(cached_model_dir("llama-gqa"))) for a in shlex.split(line)[2:]]

    class Reached(Exception):
        """The model is built and lm-eval goes on to load its tasks: the command line is good."""

    class Tasks:  # stands in for lm-eval's task index (~15 s to build); the model is the real one
        def load(self, tasks):
            raise Reached(tasks)

    built = []
    init = adapter.YunqueLM.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        built.append(self)

    monkeypatch.setattr(EvaluatorConfig, "process_tasks", lambda self, metadata=None: Tasks())
    monkeypatch.setattr(adapter.YunqueLM, "__init__", spy)
    with pytest.raises(Reached):
        main(["lm-eval", *argv])
    assert built and built[0]._batch_size == 8
