"""`yunque train` restarts once with glibc's tcache off (yunque/malloc_env.py)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from yunque.malloc_env import TUNABLE, tuned_env

ROOT = Path(__file__).resolve().parent.parent
glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_tuned_env_adds_the_tunable_once_and_keeps_others():
    assert tuned_env({})["GLIBC_TUNABLES"] == TUNABLE
    assert tuned_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert tuned_env({"GLIBC_TUNABLES": TUNABLE}) is None  # already restarted: no loop
    assert tuned_env({"YUNQUE_MALLOC_TUNING": "0"}) is None


def _main(args: list[str], env: dict) -> subprocess.CompletedProcess:
    # os.execve replaced by a print, so the test sees what the command would restart with.
    code = ("import os, sys\n"
            "os.execve = lambda exe, argv, env: (print(argv[1:3], env.get('GLIBC_TUNABLES')), sys.exit(0))\n"
            f"sys.argv = ['yunque', *{args!r}]\n"
            "from yunque.__main__ import main\nsys.exit(main())\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**_clean_env(), "PYTHONPATH": str(ROOT), **env})


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "YUNQUE_MALLOC_TUNING")}


@glibc
def test_train_from_the_command_line_restarts_tuned_and_other_commands_do_not():
    out = _main(["train", "missing.yaml"], {})
    assert out.returncode == 0 and out.stdout.strip() == f"['-m', 'yunque'] {TUNABLE}"
    off = _main(["train", "missing.yaml"], {"YUNQUE_MALLOC_TUNING": "0"})
    assert off.returncode == 2 and "missing.yaml" in off.stderr and not off.stdout  # ran in place
    assert _main(["--version"], {"GLIBC_TUNABLES": ""}).stdout.startswith("yunque ")


def test_the_real_restart_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "yunque", "train", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "usage: yunque train" in out.stdout
