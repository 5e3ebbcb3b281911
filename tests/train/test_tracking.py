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
        set_tracking_uri=lambda u: calls.append(("uri", u)), set_experiment=lambda n: calls.append(("exp", n)),
        start_run=lambda run_name: calls.append(("start", run_name)), log_params=lambda p: calls.append(("params", p)),
        log_metrics=lambda m, step: calls.append(("metrics", m, step)), end_run=lambda: calls.append(("end",)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    t = Tracker(tmp_path, mlflow=True, params={"optim": {"lr": 0.1}})
    t.log(1, "train", {"loss": 2.0, "lr": 0.1})
    t.close()
    assert calls[0] == ("uri", (tmp_path / "mlruns").resolve().as_uri())  # a local store by default
    assert ("params", {"optim.lr": "0.1"}) in calls and ("metrics", {"train_loss": 2.0, "train_lr": 0.1}, 1) in calls
    assert calls[-1] == ("end",)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0
