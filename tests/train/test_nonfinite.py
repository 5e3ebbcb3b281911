"""No NaN survives: a non-finite loss or gradient norm stops training (exit 3, the step named, the
last good checkpoint kept, nothing exported) or, under `max_bad_steps`, is skipped; no checkpoint
holds NaN/Inf; merge, quantize, export and save_model refuse such weights naming the tensor; under
torchrun every rank agrees and none hangs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nan_inject import poison_steps
from safetensors.torch import load_file, save_file
from train_util import ROOT, make_corpus, one_thread, pretrain_cfg, write_cfg

import yunque.train.loop as loop
from yunque.__main__ import main
from yunque.errors import CheckpointError

_one_thread = pytest.fixture(autouse=True)(one_thread)
STEPS = 6


@pytest.fixture(autouse=True)
def _fixed_threads(monkeypatch):
    monkeypatch.setenv("YUNQUE_THREADS", "1")  # runs compared bit for bit: no thread count chosen by load


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("nonfinite"))


def _config(corpus, tmp_path: Path, **kw) -> tuple[Path, Path]:
    out = tmp_path / "run"
    kw = {"max_steps": STEPS, "micro_batch": 2, "eval": {"every": 0}, "checkpoint": {"every": 1, "keep_last": 99}, **kw}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_cfg(tmp_path / "c.yaml", pretrain_cfg(corpus, out, **kw)), out


def _train(capsys, cfg: Path, *overrides: str) -> tuple[int, list[str]]:
    rc = main(["train", str(cfg), *overrides])
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


def _rows(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _checkpoint_steps(out: Path) -> list[int]:
    """The checkpoints' steps; every tensor in them is finite."""
    steps = []
    for d in sorted((out / "checkpoints").glob("step-*")):
        for f in d.glob("*.safetensors"):
            for name, t in load_file(str(f)).items():
                assert not t.is_floating_point() or bool(torch.isfinite(t).all()), (f, name)
        steps.append(int(d.name.removeprefix("step-")))
    return steps


def test_lr_1e10_stops_at_the_first_nan_step_and_exports_nothing(corpus, tmp_path, capsys):
    cfg, out = _config(corpus, tmp_path, optim={"lr": 1e10, "warmup_steps": 0, "schedule": "constant"})
    rc, err = _train(capsys, cfg)
    assert rc == 3 and len(err) == 1, err
    m = re.match(r"error: step (\d+): (loss is nan|.*tensor \S+ holds \d+ non-finite)", err[0])
    assert m, err
    step = int(m.group(1))
    assert 1 < step <= STEPS and "(lr 1e+10)" in err[0]
    assert f"last good checkpoint: {out / 'checkpoints' / f'step-{step - 1:08d}'}" in err[0]
    assert err[0].endswith("nothing exported")
    assert _checkpoint_steps(out) == list(range(1, step))
    assert not (out / "model").exists() and not (out / "run.json").exists()
    stop = _rows(out, "nonfinite")
    assert [(r["step"], r["action"]) for r in stop] == [(step, "stop")]
    assert sorted(_rows(out, "train"), key=lambda r: r["step"])[-1]["step"] == step - 1


@pytest.mark.parametrize("clip", ["optim.grad_clip=1.0", "optim.grad_clip=0"])  # 0: the norm is computed for the check
def test_an_injected_nan_stops_at_its_step(corpus, tmp_path, capsys, monkeypatch, clip):
    poison_steps(monkeypatch, {3})
    cfg, out = _config(corpus, tmp_path, log={"every": 4, "plot": False})
    rc, err = _train(capsys, cfg, clip)
    assert rc == 3 and len(err) == 1, err
    assert err[0].startswith("error: step 3: loss is nan, grad norm is nan (lr ") and "not applied" in err[0]
    assert _checkpoint_steps(out) == [1, 2] and not (out / "model").exists()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in rows] == [(1, "train"), (2, "train"), (3, "nonfinite")]
    assert rows[-1]["loss"] is None and rows[-1]["grad_norm"] is None and rows[-1]["action"] == "stop"


def test_max_bad_steps_skips_a_nan_step_and_finishes(corpus, tmp_path, capsys, monkeypatch):
    kw = {"log": {"every": 4, "plot": False}, "checkpoint": {"every": 100}}  # steps 1-2 are pending at step 3
    cfg, ref_out = _config(corpus, tmp_path / "ref", **kw)
    assert main(["train", str(cfg)]) == 0
    poison_steps(monkeypatch, {3})
    cfg, out = _config(corpus, tmp_path, **kw)
    rc, err = _train(capsys, cfg, "max_bad_steps=2")
    assert rc == 0 and not err, err
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in rows if r["kind"] != "eval"] == [
        (1, "train"),
        (2, "train"),
        (3, "nonfinite"),
        (4, "train"),
        (5, "train"),
        (6, "train"),
    ]
    assert rows[2]["action"] == "skip" and rows[2]["in_a_row"] == 1 and rows[2]["loss"] is None
    ref = {r["step"]: r["loss"] for r in _rows(ref_out, "train")}
    got = {r["step"]: r["loss"] for r in _rows(out, "train")}
    assert got[1] == ref[1] and got[2] == ref[2]
    assert abs(got[4] - ref[4]) > 1e-4  # step 3's update was not applied
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model" / "model.safetensors")).values())
    assert json.loads((out / "run.json").read_text())["steps"] == STEPS


def test_more_bad_steps_in_a_row_than_allowed_stop(corpus, tmp_path, capsys, monkeypatch):
    poison_steps(monkeypatch, {2, 4, 5, 6})
    cfg, out = _config(corpus, tmp_path)
    rc, err = _train(capsys, cfg, "max_bad_steps=2")
    assert rc == 3 and len(err) == 1, err
    assert (
        err[0].startswith("error: step 6: loss is nan") and "3 such steps in a row, more than max_bad_steps 2" in err[0]
    )
    rows = _rows(out, "nonfinite")
    assert [(r["step"], r["action"], r["in_a_row"]) for r in rows] == [
        (2, "skip", 1),
        (4, "skip", 1),
        (5, "skip", 2),
        (6, "stop", 3),
    ]
    assert _checkpoint_steps(out) == [1, 2, 3, 4, 5] and not (out / "model").exists()


def test_weights_that_overflow_are_never_checkpointed(corpus, tmp_path, capsys, monkeypatch):
    """A finite step whose update leaves Inf in a weight: the checkpoint of that step is not written."""
    real = loop.train_step
    calls = [0]

    def overflowing(module, *args, **kw):
        out = real(module, *args, **kw)
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                module.model.model.layers[1].mlp.up_proj.weight[2, 7] = float("inf")
        return out

    monkeypatch.setattr(loop, "train_step", overflowing)
    cfg, out = _config(corpus, tmp_path)
    rc, err = _train(capsys, cfg)
    assert rc == 3 and len(err) == 1, err
    assert err[0].startswith(
        "error: step 3: after the update, tensor model.layers.1.mlp.up_proj.weight holds 1 non-finite value(s)"
    )
    assert _checkpoint_steps(out) == [1, 2] and not (out / "model").exists()
    assert _rows(out, "nonfinite")[-1]["tensor"] == "model.layers.1.mlp.up_proj.weight"


# ---------------------------------------------------------------- exporters


@pytest.fixture
def nan_model(tmp_path):
    """A tiny HF directory whose layer-1 up_proj holds one NaN (written past save_model's check)."""
    from yunque.formats.hf import save_model
    from yunque.model import Transformer
    from yunque.presets import get_preset

    model = Transformer(get_preset("tiny", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    good = save_model(model, tmp_path / "good")
    bad = save_model(model, tmp_path / "bad")
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return good, bad


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "tensor model.layers.1.mlp.up_proj.weight holds 1 non-finite value(s)" in err[0], err
    return err[0]


def test_save_model_refuses_nonfinite_weights(nan_model, tmp_path):
    from yunque.formats.hf import load_model, save_model

    model = load_model(nan_model[1])
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight holds 1 non-finite"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_model(model, tmp_path / "out", allow_nonfinite=True)  # the escape hatch, for tests of the readers


def test_quantize_refuses_nonfinite_weights(nan_model, tmp_path, capsys):
    _one_line_error(capsys, ["quantize", str(nan_model[1]), "--bits", "8", "--out", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()


def test_merge_refuses_a_nonfinite_base_or_adapter(nan_model, tmp_path, capsys):
    from yunque.formats.hf import load_model
    from yunque.formats.peft import save_peft_adapter
    from yunque.lora import LoraConfig, apply_lora

    good, bad = nan_model
    cfg = LoraConfig(r=4, alpha=8, target_modules=["up_proj"])
    model = load_model(good)
    apply_lora(model, cfg, generator=torch.Generator().manual_seed(0))
    save_peft_adapter(model, tmp_path / "adapter", cfg, str(good))
    merge = ["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"), "--base"]
    err = _one_line_error(capsys, [*merge, str(bad)])
    assert str(bad) in err and not (tmp_path / "m").exists()

    from safetensors import safe_open

    path = str(tmp_path / "adapter" / "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    sd["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][0, 0] = float("inf")
    save_file(sd, path, metadata=meta)
    assert main([*merge, str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "model.layers.1.mlp.up_proj" in err[0], err
    assert not (tmp_path / "m").exists()


def test_save_peft_adapter_refuses_nonfinite_weights(nan_model, tmp_path):
    from yunque.formats.hf import load_model
    from yunque.formats.peft import save_peft_adapter
    from yunque.lora import LoraConfig, apply_lora, lora_modules

    cfg = LoraConfig(r=4, alpha=8, target_modules=["up_proj"])
    model = load_model(nan_model[0])
    apply_lora(model, cfg)
    with torch.no_grad():
        next(iter(lora_modules(model).values())).lora_A.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"up_proj\.lora_A\.weight holds 1 non-finite"):
        save_peft_adapter(model, tmp_path / "adapter", cfg)
    assert not (tmp_path / "adapter").exists()


def test_onnx_export_refuses_nonfinite_weights(nan_model, tmp_path, capsys):
    pytest.importorskip("onnx")
    _one_line_error(capsys, ["export", str(nan_model[1]), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "model.onnx").exists()


# ---------------------------------------------------------------- torchrun: every rank agrees


def _torchrun(cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    """2 processes; rank 1 alone gets a NaN loss at step 3; each rank's error in rank-N.txt beside `cfg`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "tests" / "helpers" / "nan_inject.py"), str(cfg), *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", YUNQUE_TEST_NAN="3@1")
    env["YUNQUE_TEST_ERRORS"] = str(cfg.parent)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_nan_on_one_rank_stops_every_rank(corpus, tmp_path, parallel):
    cfg, out = _config(corpus, tmp_path, parallel=parallel)
    p = _torchrun(cfg)  # a rank that went on alone would wait in its next collective until the timeout
    assert p.returncode != 0 and "exitcode  : 3" in p.stderr, p.stderr[-3000:]
    errors = [(tmp_path / f"rank-{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and errors[0].startswith("step 3: loss is nan, grad norm is nan"), errors
    assert _checkpoint_steps(out) == [1, 2] and not (out / "model").exists()
    assert [(r["step"], r["action"]) for r in _rows(out, "nonfinite")] == [(3, "stop")]


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_by_every_rank(corpus, tmp_path, monkeypatch):
    """Both ranks drop step 3 (rank 1's half of it is NaN): the run equals one process that drops it."""
    poison_steps(monkeypatch, {3})
    cfg, one = _config(corpus, tmp_path / "one", micro_batch=4, checkpoint={"every": 100})
    assert main(["train", str(cfg), "max_bad_steps=1"]) == 0
    cfg, two = _config(corpus, tmp_path / "two", micro_batch=2, checkpoint={"every": 100}, parallel="ddp")
    p = _torchrun(cfg, "max_bad_steps=1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [(r["step"], r["action"]) for r in _rows(two, "nonfinite")] == [(3, "skip")]
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
