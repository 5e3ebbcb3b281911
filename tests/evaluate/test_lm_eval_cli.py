"""The plain `lm_eval` command sees `--model yunque` once yunque is installed (no `yunque lm-eval`).

lm-eval <= 0.4.13 reads no plugin entry points; yunque's wheel ships `_yunque_lm_eval.pth`, which
registers the model lazily when lm-eval imports `lm_eval.models` (see _yunque_lm_eval.py and
build_hooks.py). Checked three ways: the wheels carry the .pth (regular and editable), a fresh
interpreter of this environment resolves the model while importing nothing heavy at start-up,
and the real console script gives the numbers of the in-process adapter.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from eval_helpers import cached_model_dir
from lm_eval_tasks import TASKS, task_dir

ROOT = Path(__file__).resolve().parents[2]
LM_EVAL = Path(sys.executable).with_name("lm_eval")
needs_lm_eval = pytest.mark.skipif(not LM_EVAL.is_file(), reason="lm-eval is an optional extra (pip install lm-eval)")

# A fresh interpreter: what `site` imported at start-up, then what a model lookup resolves to.
_PROBE = """
import json, sys
at_start = sorted(m for m in sys.modules if m.split(".")[0] in ("yunque", "torch", "lm_eval", "_yunque_lm_eval"))
import lm_eval.models
from lm_eval.api.registry import get_model, model_registry
before_use = sorted(m for m in sys.modules if m.split(".")[0] == "yunque")
placeholder = str(dict(model_registry.items()).get("yunque"))
cls = get_model("yunque")
print(json.dumps({"at_start": at_start, "before_use": before_use, "placeholder": placeholder,
                  "cls": f"{cls.__module__}:{cls.__qualname__}", "hf": "hf" in model_registry,
                  "finder_left": any(getattr(f, "__module__", "") == "_yunque_lm_eval" for f in sys.meta_path)}))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def _hook_installed() -> bool:
    out = subprocess.run([sys.executable, "-c", "import sys; print('_yunque_lm_eval' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_wheels_ship_the_pth_at_top_level(tmp_path):
    """Regular and editable (PEP 660) wheels both put `_yunque_lm_eval.pth` where `site` reads it."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "build_hooks.py", "_yunque_lm_eval.py"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "yunque", src / "yunque", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    # build_meta rewrites sys.argv while it builds: read the output directory first.
    code = "import setuptools.build_meta as b, sys; d = sys.argv[1]; b.build_wheel(d); b.build_editable(d)"
    res = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    (editable,) = dist.glob("yunque-*.editable-*.whl")
    (regular,) = set(dist.glob("yunque-*.whl")) - {editable}
    for wheel, expect in ((regular, {"_yunque_lm_eval.pth", "_yunque_lm_eval.py"}), (editable, {"_yunque_lm_eval.pth"})):
        with zipfile.ZipFile(wheel) as z:
            top = {n for n in z.namelist() if "/" not in n}
            assert expect <= top, (wheel, top)
            assert z.read("_yunque_lm_eval.pth").decode() == "import _yunque_lm_eval\n"


@needs_lm_eval
def test_fresh_interpreter_resolves_yunque_without_importing_it_at_start(tmp_path):
    if not _hook_installed():
        pytest.skip("this environment's yunque install predates _yunque_lm_eval.pth: reinstall it (pip install -e .)")
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["at_start"] == ["_yunque_lm_eval"]  # no yunque, torch or lm_eval at interpreter start
    assert got["before_use"] == []  # importing lm-eval registers a placeholder; yunque loads only when used
    assert "yunque.evaluate.lm_eval_adapter:YunqueLM" in got["placeholder"]
    assert got["cls"] == "yunque.evaluate.lm_eval_adapter:YunqueLM"
    assert got["hf"]  # lm-eval's own models are still there
    assert not got["finder_left"]  # the hook removed itself once it had registered


@needs_lm_eval
@pytest.mark.slow  # the real CLI indexes lm-eval's ~14k built-in task files first (~15 s CPU)
def test_plain_lm_eval_command_matches_the_adapter(tmp_path, monkeypatch):
    if not _hook_installed():
        pytest.skip("this environment's yunque install predates _yunque_lm_eval.pth: reinstall it (pip install -e .)")
    model_dir = cached_model_dir("llama-gqa")
    tasks = task_dir(tmp_path)
    out = tmp_path / "out"
    res = subprocess.run([str(LM_EVAL), "--model", "yunque", "--model_args", f"pretrained={model_dir},max_length=64",
                          "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--batch_size", "2",
                          "--device", "cpu", "--seed", "0,0,0,0", "--output_path", str(out)],
                         capture_output=True, text=True, env=_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    cli = json.loads(results_file.read_text(encoding="utf-8"))["results"]

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import yunque.evaluate.lm_eval_adapter  # noqa: F401  (registers "yunque" in this process)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ref = simple_evaluate(model="yunque", model_args=f"pretrained={model_dir},max_length=64", tasks=TASKS,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=2,
                          device="cpu", random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0)["results"]
    compared = 0
    for task in TASKS:
        for key, v in ref[task].items():
            if isinstance(v, float) and not key.endswith("_stderr,none") and math.isfinite(v):
                assert cli[task][key] == pytest.approx(v, rel=1e-6, abs=1e-9), (task, key)
                compared += 1
    assert compared >= 6  # acc, acc_norm, three perplexities, exact_match
