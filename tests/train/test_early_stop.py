"""Early stopping exports the best evaluation's weights, and a LoRA checkpoint is a PEFT adapter directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_util import make_corpus, one_thread, pretrain_cfg

from yunque.config import from_dict
from yunque.recipes.train import train
from yunque.train.config import TrainConfig

_one_thread = pytest.fixture(autouse=True)(one_thread)
# min_delta larger than any loss change: only the first evaluation (step 1) improves, so with patience 2
# the run stops at step 3 with its best weights two steps behind.
EARLY = {
    "max_steps": 8,
    "eval": {"every": 1, "patience": 2, "min_delta": 100.0},
    "checkpoint": {"every": 0, "keep_last": 1},
    "log": {"every": 1, "plot": False},
}


def _step(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def _check_stopped_after_best(r, run) -> None:
    assert r.stopped_early and (r.best_step, r.steps) == (1, 3)
    best, last = _step(run, 1), _step(run, 3)
    assert any(not torch.equal(best[k], last[k]) for k in best)  # the weights did move after the best step


def _check_says_exported(r, run) -> None:
    assert r.exported_step == 1 and json.loads((run / "run.json").read_text())["exported_step"] == 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("es") / "corpus")


@pytest.fixture(scope="module")
def lora_run(corpus, tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_models import tiny_hf_model

    from yunque.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("es-lora")
    tok = Tokenizer.from_dir(corpus["tok"])
    tiny_hf_model("llama-gqa", vocab_size=tok.vocab_size).save_pretrained(d / "base")
    tok.save(d / "base")
    cfg = {
        "method": "lora",
        "out_dir": str(d / "run"),
        "seed": 3,
        "model": {"path": str(d / "base")},
        "data": {"train": [str(corpus["sft"])], "val_fraction": 0.1, "seq_len": 48},
        "micro_batch": 4,
        "optim": {"lr": 5e-2, "warmup_steps": 0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        **EARLY,
    }
    return train(from_dict(TrainConfig, cfg)), d


def test_pretrain_early_stop_exports_the_best_step(corpus, tmp_path):
    cfg = pretrain_cfg(corpus, tmp_path / "run", **EARLY)
    r = train(from_dict(TrainConfig, cfg))
    _check_stopped_after_best(r, tmp_path / "run")
    exported = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    best = _step(tmp_path / "run", 1)
    assert exported and set(exported) <= set(best)  # the tied head is not written twice
    for k, v in exported.items():
        torch.testing.assert_close(v, best[k], atol=0, rtol=0)
    _check_says_exported(r, tmp_path / "run")


def test_lora_early_stop_exports_the_best_step(lora_run):
    r, d = lora_run
    _check_stopped_after_best(r, d / "run")
    from yunque.formats.peft import PREFIX

    exported = load_file(str(d / "run" / "adapter" / "adapter_model.safetensors"))
    best = _step(d / "run", 1)
    assert set(exported) == {PREFIX + k for k in best}
    for k, v in best.items():
        torch.testing.assert_close(exported[PREFIX + k], v, atol=0, rtol=0)
    _check_says_exported(r, d / "run")


def test_lora_checkpoint_is_an_adapter_merge_takes(lora_run, tmp_path, capsys):
    from yunque.recipes.merge import merge_cmd

    _, d = lora_run
    ckpt = d / "run" / "checkpoints" / "step-00000001"
    merge_cmd(base=str(d / "base"), adapter=str(ckpt), out=str(tmp_path / "from-ckpt"))
    merge_cmd(base=str(d / "base"), adapter=str(d / "run" / "adapter"), out=str(tmp_path / "from-adapter"))
    a, b = (load_file(str(tmp_path / x / "model.safetensors")) for x in ("from-ckpt", "from-adapter"))
    base = load_file(str(d / "base" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base)  # the adapter was merged in
