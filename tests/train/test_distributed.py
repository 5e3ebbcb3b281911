"""torchrun with gloo on CPU: 2 processes == 1 process with the same global batch; resume with 2 processes."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from train_util import losses, make_corpus, pretrain_cfg, run_cli, write_cfg
from yunque.train.checkpoint import CRASH_ENV

pytestmark = pytest.mark.slow  # each torchrun launch starts 3 Python processes (~20 s on the shared box)
STEPS = 8


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    corpus = make_corpus(d / "corpus")
    cfg = pretrain_cfg(corpus, d / "one", max_steps=STEPS, micro_batch=4, grad_accum=2,
                       data={"train": [str(corpus["sft"])], "val_fraction": 0.1, "seq_len": 48, "pack": "whole"},
                       checkpoint={"every": 3, "keep_last": 1}, eval={"every": 4})
    p = run_cli([str(write_cfg(d / "one.yaml", cfg))])
    assert p.returncode == 0, p.stderr
    return d, cfg


def _metrics(run):
    import json

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["kind"], r.get("loss", r.get("val_loss"))) for r in rows]


def _close(a, b, tol=1e-5):
    assert [x[:2] for x in a] == [x[:2] for x in b]
    worst = max(abs(x[2] - y[2]) for x, y in zip(a, b))
    assert worst <= tol, worst


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(single, tmp_path, parallel):
    d, cfg = single
    path = write_cfg(tmp_path / "c.yaml", dict(cfg, out_dir=str(tmp_path / "run"), micro_batch=2))  # 2 x 2 rows = 4
    p = run_cli([str(path), f"parallel={parallel}"], torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:]
    _close(_metrics(d / "one"), _metrics(tmp_path / "run"))
    a, b = load_file(str(d / "one" / "model" / "model.safetensors")), load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_two_process_fsdp_killed_in_checkpoint_write_resumes_exactly(single, tmp_path):
    d, cfg = single
    path = write_cfg(tmp_path / "c.yaml", dict(cfg, out_dir=str(tmp_path / "run"), micro_batch=2, parallel="fsdp"))
    p = run_cli([str(path)], torchrun=2, env={CRASH_ENV: "6"})
    assert p.returncode != 0
    ck = sorted(x.name for x in (tmp_path / "run" / "checkpoints").iterdir())
    assert "step-00000006" not in ck and any(x.startswith(".tmp-step-00000006") for x in ck)
    p = run_cli([str(path), "--resume"], torchrun=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr
    ref, got = losses(d / "one"), losses(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(ref[s] - got[s]) for s in ref) <= 1e-5
