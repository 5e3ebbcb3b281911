"""Run tracking: metrics.jsonl always, MLflow and TensorBoard when asked, a loss/lr plot at the end.

metrics.jsonl is the source of truth: one JSON object per line, `{"step": n, "kind": "train"|"eval", ...}`.
On resume the lines past the checkpoint's step are dropped, so the file reads like one
uninterrupted run. MLflow and TensorBoard are imported only when enabled, so neither is a
dependency of training.

MLflow: by default a local SQLite store in the run directory, `sqlite:///OUT_DIR/mlflow.db`, with
artifacts under OUT_DIR/mlartifacts (MLflow deprecates its `file:` store); see it with
`mlflow ui --backend-store-uri sqlite:///OUT_DIR/mlflow.db`. `log.mlflow_uri` names another
store or a tracking server. Each session is one MLflow run (experiment "yunque") with the
flattened config as parameters, the metrics, and as artifacts the config (config.yaml), the data
manifest's roots (data_manifest.json, with a prepared data directory) and, at the end, run.json:
the run's card (config, data roots, final and best metrics, hashes of every output file).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from yunque.errors import ConfigError
from yunque.untrusted import open_append, refuse_symlink, write_replacing


class Tracker:
    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool = True,
        mlflow: bool = False,
        mlflow_uri: str | None = None,
        tensorboard: bool = False,
        run_name: str = "yunque",
        params: dict | None = None,
        manifest: dict | None = None,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._mlflow = self._tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # Never through a symlink planted at the name: it would be truncated, or read back as ours.
        refuse_symlink(self.path, ConfigError)
        if resume_step is not None and self.path.exists():
            keep = [
                ln
                for ln in self.path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and _step_of(ln) <= resume_step
            ]
            write_replacing(self.path, "".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            write_replacing(self.path, "")
        self._fh = open_append(self.path, ConfigError)
        if mlflow:
            self._mlflow = _MlflowRun(out_dir, mlflow_uri, run_name, params or {}, manifest)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "log.tensorboard: needs the tensorboard package (pip install 'yunque[track]')"
                ) from None

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        self._fh.flush()
        nums = {f"{kind}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._mlflow is not None:
            self._mlflow.metrics({k.replace("/", "_"): v for k, v in nums.items()}, step)
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, step)

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._mlflow is not None:
            self._mlflow.end(status)
        if self._tb is not None:
            self._tb.close()

    def log_artifact(self, path: Path) -> None:
        """A file of the finished run (run.json) as an artifact of its MLflow run, if there is one."""
        if self._mlflow is not None:
            self._mlflow.artifact(path)


class _MlflowRun:
    """One MLflow run through an explicit client: nothing process-global (tracking URI, active run)
    is set, so a notebook's own MLflow use and this run's do not mix."""

    def __init__(self, out_dir: Path, uri: str | None, run_name: str, params: dict, manifest: dict | None):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("log.mlflow: needs the mlflow package (pip install 'yunque[track]')") from None
        out = out_dir.resolve()
        self.client = MlflowClient(uri or f"sqlite:///{out / 'mlflow.db'}")
        exp = self.client.get_experiment_by_name("yunque")
        if exp is not None:
            exp_id = exp.experiment_id
        else:  # the default store keeps artifacts beside it, not in ./mlruns of the working directory
            exp_id = self.client.create_experiment("yunque", None if uri else (out / "mlartifacts").as_uri())
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        flat = list(_flat(params).items())
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat[i : i + 100]])
        self.client.log_dict(self.run_id, params, "config.yaml")
        if manifest:
            self.client.log_dict(self.run_id, manifest, "data_manifest.json")

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a killed run: drop it


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:250]
    return out


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def plot_metrics(metrics_path: Path, out_png: Path) -> Path | None:
    """Training and validation loss (left axis) and learning rate (right axis) against step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    tr = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss", lw=1)
    if ev:
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in tr], [r["lr"] for r in tr], color="gray", ls="--", lw=1, label="lr")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out_png.stem}.", suffix=".png", dir=out_png.parent)  # never a planted link
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_png


class Progress:
    """On a terminal, one progress bar redrawn in place (rich.progress): step, loss, lr, tokens/s, ETA,
    with messages (evals, warnings) printed above it. Otherwise (a log file, a pipe) plain lines:
    one per log step, and between log steps one at least every `every_s` seconds (`tick`), so a
    slow machine never looks stalled. `close()` ends the bar."""

    every_s = 10.0
    redraw_s = 0.1  # the bar is redrawn from the training loop, at most this often: no refresh thread

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.total, self.start, self.enabled = total_steps, start_step, enabled
        self.t0 = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._bar = self._task = None
        self._info = ""
        if enabled and self.tty:
            from rich.console import Console

            console = Console(file=sys.stderr)
            if console.is_terminal and not console.is_dumb_terminal:
                self._start_bar(console)

    def _start_bar(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[info]}", markup=False),
            console=console,
            auto_refresh=False,
        )
        self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        self._bar.start()
        self._bar.refresh()

    def _draw(self, step: int, info: str, force: bool) -> None:
        self._bar.update(self._task, completed=step, info=info)
        now = time.perf_counter()
        if force or now - self.last >= self.redraw_s:
            self._bar.refresh()
            self.last = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _eta(self, step: int) -> tuple[float, float]:
        done = step - self.start
        el = time.perf_counter() - self.t0
        return el, (el / done * (self.total - step) if done > 0 else 0.0)

    def update(self, step: int, loss: float, lr: float, tok_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        _, eta = self._eta(step)
        if self._bar is not None:
            self._info = f"loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s{(' | ' + extra) if extra else ''}"
            self._draw(step, f"{self._info} | eta {_hms(eta)}", force=True)
            return
        line = (
            f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
            f"eta {_hms(eta)}{(' | ' + extra) if extra else ''}"
        )
        self._print(line)

    def tick(self, step: int) -> None:
        """Called after every step; prints only when nothing was printed for `every_s` seconds. The
        loss is left for the log step: here it would be this rank's alone and cost a sync."""
        if self._bar is not None:
            el, eta = self._eta(step)
            info = self._info or f"{el / max(1, step - self.start):.1f} s/step"
            self._draw(step, f"{info} | eta {_hms(eta)}", force=False)
            return
        if not self.enabled or time.perf_counter() - self.last < self.every_s:
            return
        el, eta = self._eta(step)
        self._print(f"step {step}/{self.total} | {el / max(1, step - self.start):.1f} s/step | eta {_hms(eta)}")

    def message(self, text: str) -> None:
        if self._bar is not None:  # above the bar, as it is: no markup, no highlighting
            self._bar.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
            self._bar.refresh()
        elif self.enabled:
            self._print(text)

    def _print(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        self.last = time.perf_counter()


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
