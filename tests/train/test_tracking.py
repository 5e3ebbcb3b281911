"""Tracking: metrics.jsonl survives a resume as one run; MLflow/TensorBoard are optional and say so."""

from __future__ import annotations

import json
import sys
import types

import pytest

from yunque.errors import ConfigError
from yunque.train.tracking import Tracker, plot_metrics, read_metrics


def test_resume_drops_lines_past_the_checkpoint_and_torn_lines(tmp_path):
    t = Tracker(tmp_path)
    for s in range(1, 6):
        t.log(s, "train", {"loss": 1.0 / s, "lr": 0.1})
    t.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "kind": "tr')  # killed mid-line
    t = Tracker(tmp_path, resume_step=3)
    t.log(4, "train", {"loss": 9.0, "lr": 0.1})
    t.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 9.0
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_optional_backends_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match="log.mlflow: needs the mlflow package"):
        Tracker(tmp_path, mlflow=True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="log.tensorboard: needs the tensorboard package"):
        Tracker(tmp_path, tensorboard=True)


def test_mlflow_gets_params_and_metrics(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        set_tracking_uri=lambda u: calls.append(("uri", u)),
        set_experiment=lambda n: calls.append(("exp", n)),
        start_run=lambda run_name: calls.append(("start", run_name)),
        log_params=lambda p: calls.append(("params", p)),
        log_metrics=lambda m, step: calls.append(("metrics", m, step)),
        end_run=lambda: calls.append(("end",)),
    )
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    t = Tracker(tmp_path, mlflow=True, params={"optim": {"lr": 0.1}})
    t.log(1, "train", {"loss": 2.0, "lr": 0.1})
    t.close()
    assert calls[0] == ("uri", (tmp_path / "mlruns").resolve().as_uri())  # a local store by default
    assert ("params", {"optim.lr": "0.1"}) in calls and ("metrics", {"train_loss": 2.0, "train_lr": 0.1}, 1) in calls
    assert calls[-1] == ("end",)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0


def test_progress_prints_between_log_steps_when_slow(monkeypatch, capsys):
    """A slow machine never looks stalled: without a log line for `every_s`, a step line with an ETA."""
    from yunque.train import tracking

    now = [100.0]
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: now[0])
    p = tracking.Progress(total_steps=100, start_step=0, enabled=True)
    p.tick(1)
    assert capsys.readouterr().err == ""  # nothing yet: under every_s since the start
    now[0] += 12.0
    p.tick(1)
    assert capsys.readouterr().err == "step 1/100 | 12.0 s/step | eta 19m48s\n"
    now[0] += 5.0
    p.tick(2)
    assert capsys.readouterr().err == ""  # 5 s after the last line
    now[0] += 6.0
    p.update(3, 2.5, 1e-3, 100.0)  # a log line resets the clock
    now[0] += 6.0
    p.tick(4)
    assert capsys.readouterr().err.startswith("step 3/100 | loss 2.5000")
    tracking.Progress(100, 0, enabled=False).tick(50)
    assert capsys.readouterr().err == ""


def test_training_ticks_every_step(tmp_path, monkeypatch, capsys):
    from train_util import make_corpus, pretrain_cfg

    from yunque.config import from_dict
    from yunque.recipes.train import train
    from yunque.train.config import TrainConfig
    from yunque.train.tracking import Progress

    monkeypatch.setattr(Progress, "every_s", 0.0)  # every step is "slow"
    corpus = make_corpus(tmp_path / "c", n_lines=60)
    train(
        from_dict(
            TrainConfig,
            pretrain_cfg(
                corpus,
                tmp_path / "run",
                max_steps=4,
                log={"every": 4, "plot": False},
                eval={"every": 0},
                checkpoint={"every": 0},
            ),
        )
    )
    err = capsys.readouterr().err
    for step in (1, 2, 3):
        assert f"step {step}/4 | " in err and "s/step" in err
    assert "step 4/4 | loss" in err
