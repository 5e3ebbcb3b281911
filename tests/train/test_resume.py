"""Exact resume: SIGKILL at a random step, or in the middle of writing a checkpoint, then --resume
gives the per-step losses of the uninterrupted run (<= 1e-6)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from train_util import ROOT, losses, make_corpus, one_thread, pretrain_cfg, run_cli, write_cfg

from yunque.train.checkpoint import CRASH_ENV, latest_checkpoint, list_checkpoints

_one_thread = pytest.fixture(autouse=True)(one_thread)
pytestmark = pytest.mark.slow  # subprocesses: ~30 s each on the shared 2-core box
STEPS = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    corpus = make_corpus(d / "corpus")
    # Shuffled whole-document SFT packing that crosses an epoch boundary: the data position matters.
    cfg = pretrain_cfg(
        corpus,
        d / "ref",
        max_steps=STEPS,
        data={"train": [str(corpus["sft"])], "val_fraction": 0.1, "seq_len": 48, "pack": "whole"},
        checkpoint={"every": 3, "keep_last": 2},
        eval={"every": 5},
    )
    ref = write_cfg(d / "ref.yaml", cfg)
    p = run_cli([str(ref)])
    assert p.returncode == 0, p.stderr
    return d, cfg, losses(d / "ref")


def _assert_same(ref: dict[int, float], got: dict[int, float]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(ref[s] - got[s]) for s in ref)
    assert worst <= 1e-6, worst


def test_sigkill_at_random_step_then_resume(setup, tmp_path):
    d, cfg, ref = setup
    path = write_cfg(tmp_path / "c.yaml", dict(cfg, out_dir=str(tmp_path / "run")))
    kill_at = random.Random().randint(4, STEPS - 2)
    print(f"killing at step {kill_at}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "yunque.recipes.train", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= kill_at:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is not None
    p = run_cli([str(path), "--resume"])
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stderr
    _assert_same(ref, losses(tmp_path / "run"))


def test_sigkill_while_writing_checkpoint_then_resume(setup, tmp_path):
    d, cfg, ref = setup
    path = write_cfg(tmp_path / "c.yaml", dict(cfg, out_dir=str(tmp_path / "run")))
    p = run_cli([str(path)], env={CRASH_ENV: "9"})  # killed after model.safetensors of step 9, before the rest
    assert p.returncode == -signal.SIGKILL
    ck = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in list_checkpoints(ck)] == [5, 6]  # 5: best eval so far, 6: last
    assert any(x.name.startswith(".tmp-step-00000009") for x in ck.iterdir())  # the torn write is there, ignored
    p = run_cli([str(path), "resume=auto"])
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stderr and "step-00000006" in p.stderr
    assert not any(x.name.startswith(".tmp-") for x in ck.iterdir())
    _assert_same(ref, losses(tmp_path / "run"))


def test_resume_without_checkpoint_starts_fresh_and_corrupt_checkpoint_is_an_error(setup, tmp_path):
    from yunque.config import from_dict
    from yunque.errors import CheckpointError
    from yunque.recipes.train import train
    from yunque.train.config import TrainConfig

    d, cfg, ref = setup
    c = from_dict(
        TrainConfig,
        dict(
            cfg,
            out_dir=str(tmp_path / "run"),
            max_steps=3,
            resume="auto",
            checkpoint={"every": 3, "keep_last": 1},
            eval={"every": 0},
        ),
    )
    r = train(c)  # nothing to resume: a fresh run with the reference's first losses
    assert r.steps == 3 and all(abs(r.losses[i] - ref[i + 1]) <= 1e-6 for i in range(3))
    (tmp_path / "run" / "checkpoints" / "step-00000003" / "optimizer.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="optimizer.safetensors: cannot read safetensors"):
        train(c)
