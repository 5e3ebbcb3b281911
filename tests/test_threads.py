"""The thread policy: as many torch threads as other processes leave cores free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from yunque import threads


class FakeProc:
    """Scripted /proc readings: other processes' busy cores and our own, per second of a fake clock."""

    def __init__(self, tick_hz: float):
        self.t, self.busy, self.own, self.hz = 0.0, 0.0, 0.0, tick_hz

    def advance(self, seconds: float, others: float, ours: float) -> None:
        self.t += seconds
        self.busy += (others + ours) * seconds * self.hz
        self.own += ours * seconds * self.hz

    def read(self):
        return self.busy, self.own


def make_policy(monkeypatch, every=5.0, cores=2):
    monkeypatch.delenv("YUNQUE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_affinity", lambda: list(range(cores)))
    monkeypatch.setattr(threads, "_torch_default", cores)
    proc = FakeProc(threads.os.sysconf("SC_CLK_TCK"))
    seen = []
    pol = threads.ThreadPolicy(every=every, read=proc.read, clock=lambda: proc.t, set_threads=seen.append)
    pol.threads = cores
    return pol, proc, seen


def test_one_busy_neighbour_on_two_cores_gives_one_thread_and_back(monkeypatch):
    pol, proc, seen = make_policy(monkeypatch)
    pol.update()  # first reading: nothing to compare with yet
    proc.advance(6, others=1.0, ours=1.0)
    assert pol.update() == 1 and seen == [1]
    assert pol.others == pytest.approx(1.0)
    proc.advance(6, others=0.05, ours=1.0)
    assert pol.update() == 2 and seen == [1, 2]


def test_our_own_threads_do_not_count_as_load(monkeypatch):
    pol, proc, seen = make_policy(monkeypatch)
    pol.update()
    proc.advance(6, others=0.0, ours=2.0)
    assert pol.update() == 2 and seen == []


def test_close_gives_torch_its_count_back(monkeypatch):
    pol, proc, seen = make_policy(monkeypatch)
    pol._initial = 2
    pol.update()
    proc.advance(6, others=1.0, ours=1.0)
    assert pol.update() == 1
    pol.close()
    assert seen == [1, 2] and pol.threads == 2


def test_rechecks_only_every_few_seconds(monkeypatch):
    pol, proc, seen = make_policy(monkeypatch, every=5.0)
    pol.update()
    proc.advance(1, others=2.0, ours=0.0)
    assert pol.update() == 2 and seen == []  # too soon: the window is still open
    proc.advance(5, others=2.0, ours=0.0)
    assert pol.update() == 1  # never below one thread


def test_user_fixed_count_is_kept(monkeypatch):
    monkeypatch.setenv("YUNQUE_THREADS", "3")
    assert threads.fixed_threads() == 3
    monkeypatch.delenv("YUNQUE_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1,1")
    assert threads.fixed_threads() == 1
    pol = threads.ThreadPolicy(read=lambda: (0.0, 0.0), set_threads=lambda n: pytest.fail("changed a fixed count"))
    assert pol.update() == pol.threads


@pytest.mark.skipif(threads._read_proc() is None, reason="needs Linux /proc")
def test_measures_a_real_busy_process():
    """A child spinning on one core shows up as about one core of other load."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        pol = threads.ThreadPolicy(set_threads=lambda n: None)
        if pol.fixed is not None:
            pytest.skip("thread count fixed by the environment")
        pol.start(window=1.0)
        assert pol.others > 0.6, pol.others
    finally:
        spin.kill()
        spin.wait()
    assert torch.get_num_threads() >= 1


def test_training_progress_names_its_thread_count(tmp_path):
    from train_util import make_corpus, pretrain_cfg, run_cli, write_cfg

    corpus = make_corpus(tmp_path / "c", n_lines=60)
    cfg = write_cfg(
        tmp_path / "c.yaml",
        pretrain_cfg(corpus, tmp_path / "run", max_steps=2, eval={"every": 0}, checkpoint={"every": 0}),
    )
    r = run_cli([str(cfg)])  # OMP_NUM_THREADS=1: a count the user fixed
    assert r.returncode == 0, r.stderr
    assert "training on cpu with 1 thread" in r.stderr
    assert "| 1 thr" in r.stderr  # every progress line says it
