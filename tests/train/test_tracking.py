"""Tracking: metrics.jsonl survives a resume as one run; MLflow/TensorBoard are optional and say so."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

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


@pytest.fixture
def single_thread():
    from train_util import one_thread

    yield from one_thread()


def test_mlflow_logs_to_a_local_sqlite_store_with_artifacts(tmp_path, monkeypatch, single_thread):
    """The real MLflow (the `track` extra): a run in OUT_DIR/mlflow.db, its artifacts beside it, nothing
    in the working directory, the config, the data manifest's roots and run.json as artifacts."""
    pytest.importorskip("mlflow", reason="mlflow is the optional `track` extra: pip install 'yunque[track]'")
    from mlflow.tracking import MlflowClient
    from train_util import make_corpus, pretrain_cfg

    from yunque.config import from_dict
    from yunque.data.config import DataConfig
    from yunque.data.pipeline import prepare
    from yunque.recipes.train import train
    from yunque.train.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    corpus = make_corpus(tmp_path / "corpus", n_lines=60)
    prepare([corpus["sft"]], tmp_path / "data", DataConfig(tokenizer=corpus["tok"], workers=1), log=lambda *a: None)
    out = tmp_path / "run"
    cfg = pretrain_cfg(
        corpus, out, data={"dir": str(tmp_path / "data"), "train": []}, max_steps=3, log={"mlflow": True}
    )
    cfg["data"].pop("val_fraction")
    r = train(from_dict(TrainConfig, cfg))

    assert not (tmp_path / "mlruns").exists() and not (out / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("yunque").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.003"
    history = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    losses = [m.value for m in history]
    assert losses == pytest.approx(r.losses)
    assert run.info.artifact_uri == (out / "mlartifacts").as_uri() + f"/{run.info.run_id}/artifacts"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"config.yaml", "data_manifest.json", "run.json"}
    run_json = json.loads(r.run_json.read_text())
    stored = out / "mlartifacts" / run.info.run_id / "artifacts"
    assert json.loads((stored / "data_manifest.json").read_text()) == run_json["data"]["manifest_roots"]
    assert json.loads((stored / "run.json").read_text()) == run_json
    assert yaml.safe_load((stored / "config.yaml").read_text()) == run_json["config"]
    assert not any(k.startswith("mlflow") or k.startswith("mlartifacts") for k in run_json["files_sha256"])


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


def test_progress_on_a_terminal_is_one_bar_redrawn_in_place(monkeypatch):
    """On a TTY: a rich progress bar updated in place, messages above it; the plain lines (what logs
    and the test above read) only when stderr is not a terminal."""
    import io

    from yunque.train import tracking

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "160")
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    p = tracking.Progress(total_steps=10, start_step=0, enabled=True)
    for step in range(1, 11):
        p.tick(step)
        if step % 5 == 0:
            p.update(step, 2.5 / step, 1e-3, 1234.0)
            p.message(f"eval step {step} | val_loss [1.0] | see *this*")
    p.close()  # the loop closes it however training ends
    out = term.getvalue()
    assert "\x1b[2K" in out  # the bar's line is erased and redrawn, not appended
    assert "step 1/10 |" not in out and "step 10/10 |" not in out  # no plain log lines
    assert "10/10" in out and "loss 0.2500" in out and "1,234 tok/s" in out
    assert "eval step 5 | val_loss [1.0] | see *this*" in out  # messages verbatim, no markup
    assert out.index("eval step 5") < out.rindex("10/10")
