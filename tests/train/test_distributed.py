"""torchrun with gloo on CPU: 2 processes == 1 process with the same global batch; resume with 2 processes;
the default under torchrun is data parallel; FSDP LoRA / QLoRA adapters are written whole."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_util import ROOT, losses, make_corpus, pretrain_cfg, run_cli, write_cfg

from yunque.config import from_dict
from yunque.errors import ConfigError
from yunque.train import distributed as D
from yunque.train.checkpoint import CRASH_ENV
from yunque.train.config import TrainConfig

pytestmark = pytest.mark.slow  # each torchrun launch starts 3 Python processes (~20 s on the shared box)
STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    return d, make_corpus(d / "corpus")


@pytest.fixture(scope="module")
def single(corpus):
    d, corpus = corpus
    cfg = pretrain_cfg(
        corpus,
        d / "one",
        max_steps=STEPS,
        micro_batch=4,
        grad_accum=2,
        data={"train": [str(corpus["sft"])], "val_fraction": 0.1, "seq_len": 48, "pack": "whole"},
        checkpoint={"every": 3, "keep_last": 1},
        eval={"every": 4},
    )
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
    a, b = (
        load_file(str(d / "one" / "model" / "model.safetensors")),
        load_file(str(tmp_path / "run" / "model" / "model.safetensors")),
    )
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


def _train_ranks(cfg: dict, path, n: int = 2) -> list[dict[str, torch.Tensor]]:
    """torchrun the rank_weights worker: every rank's trainable parameters after training."""
    cfg_path = write_cfg(path / "c.yaml", cfg)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            str(ROOT / "tests" / "helpers" / "rank_weights.py"),
            str(cfg_path),
            str(path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return [load_file(str(path / f"rank-{r}.safetensors")) for r in range(n)]


def _same(a: dict, b: dict, **tol) -> None:
    assert a and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


def test_parallel_auto_is_ddp_under_torchrun_and_none_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init("auto", "cpu").kind == "none"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="parallel: none, but torchrun started 2 processes"):
        D.init("none", "cpu")
    assert TrainConfig().parallel == "auto"


def test_torchrun_with_the_default_parallel_keeps_ranks_identical(single, tmp_path):
    d, cfg = single
    assert "parallel" not in cfg
    ranks = _train_ranks(dict(cfg, out_dir=str(tmp_path / "run"), micro_batch=2, max_steps=3), tmp_path)
    _same(ranks[0], ranks[1], atol=0, rtol=0)  # gradients all-reduced: not two diverging copies


def test_torchrun_with_parallel_none_stops_naming_the_field(single, tmp_path):
    d, cfg = single
    path = write_cfg(tmp_path / "c.yaml", dict(cfg, out_dir=str(tmp_path / "run"), parallel="none"))
    p = run_cli([str(path)], torchrun=2)
    assert p.returncode != 0
    assert "error: parallel: none, but torchrun started 2 processes" in p.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def hf_base(corpus):
    pytest.importorskip("transformers")
    from hf_models import tiny_hf_model

    from yunque.tokenizer import Tokenizer

    d, corpus = corpus
    tok = Tokenizer.from_dir(corpus["tok"])
    tiny_hf_model("llama-gqa", vocab_size=tok.vocab_size).save_pretrained(d / "base")
    tok.save(d / "base")
    return corpus, d / "base"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp_adapter_is_written_whole_and_loads(hf_base, tmp_path, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from yunque.formats.hf import load_model
    from yunque.formats.peft import load_peft_adapter
    from yunque.lora import lora_state_dict
    from yunque.recipes.train import train

    corpus, base = hf_base
    # dropout 0: each rank draws its own masks, so only then do 2 processes equal 1
    cfg = {
        "method": method,
        "out_dir": str(tmp_path / "fsdp"),
        "seed": 3,
        "model": {"path": str(base)},
        "data": {"train": [str(corpus["sft"])], "val_fraction": 0.1, "seq_len": 48},
        "micro_batch": 2,
        "max_steps": 3,
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "eval": {"every": 0},
        "checkpoint": {"every": 2},
        "log": {"plot": False},
    }
    ranks = _train_ranks(dict(cfg, parallel="fsdp"), tmp_path)
    _same(ranks[0], ranks[1], atol=0, rtol=0)
    for adapter in (tmp_path / "fsdp" / "checkpoints" / "step-00000002", tmp_path / "fsdp" / "adapter"):
        model = load_model(base)
        lc = load_peft_adapter(model, adapter)
        assert lc.quantize_base == (method == "qlora")
    _same(lora_state_dict(model), ranks[0], atol=0, rtol=0)  # the last one: the final adapter
    one = train(from_dict(TrainConfig, dict(cfg, out_dir=str(tmp_path / "one"), micro_batch=4)))  # same global batch
    _same(
        load_file(str(one.output / "adapter_model.safetensors")),
        load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")),
        atol=1e-5,
        rtol=1e-4,
    )
