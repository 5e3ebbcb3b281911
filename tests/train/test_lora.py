"""LoRA / QLoRA / full fine-tuning through the one loop: adapters load in peft with identical logits."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from train_util import make_corpus, one_thread

from yunque.config import from_dict
from yunque.recipes.train import train
from yunque.train.config import TrainConfig

_one_thread = pytest.fixture(autouse=True)(one_thread)
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from hf_models import tiny_hf_model

    from yunque.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("ft")
    corpus = make_corpus(d / "corpus")
    tok = Tokenizer.from_dir(corpus["tok"])
    hf = tiny_hf_model("llama-gqa", vocab_size=tok.vocab_size)
    with torch.no_grad():  # HF's init (std 0.02) caps |logits| near 1 under a frozen head: give LoRA room to learn
        hf.lm_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    hf.save_pretrained(d / "base")
    tok.save(d / "base")
    return corpus, d / "base"


def _cfg(corpus, base, out, method, **kw) -> TrainConfig:
    cfg = {
        "method": method,
        "out_dir": str(out),
        "seed": 3,
        "model": {"path": str(base)},
        "data": {"train": [str(corpus["sft"])], "val_fraction": 0.1, "seq_len": 64},
        "micro_batch": 4,
        "max_steps": 20,
        "optim": {"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "eval": {"every": 10},
        "checkpoint": {"every": 6},
        "log": {"plot": False},
    }
    cfg.update(kw)
    return from_dict(TrainConfig, cfg)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_learns_and_exports_a_peft_adapter(base, tmp_path):
    peft = pytest.importorskip("peft")
    corpus, base_dir = base
    r = train(_cfg(corpus, base_dir, tmp_path / "run", "lora"))
    assert sum(r.losses[-3:]) < 0.85 * sum(r.losses[:3])
    ad = tmp_path / "run" / "adapter"
    assert r.output == ad and (ad / "adapter_config.json").is_file() and (ad / "adapter_model.safetensors").is_file()
    ck = r.best_checkpoint
    from safetensors.torch import load_file

    saved = load_file(str(ck / "model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # adapter-only checkpoints

    from yunque.formats.hf import load_model
    from yunque.formats.peft import load_peft_adapter

    ours = load_model(base_dir).eval()
    load_peft_adapter(ours, ad)
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), ad).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert (_hf_logits(hf, ids) - _hf_logits(base_hf, ids)).abs().max() > 1e-3  # the adapter changed something


def test_lora_resume_is_exact(base, tmp_path):
    corpus, base_dir = base
    ref = train(
        _cfg(
            corpus,
            base_dir,
            tmp_path / "a",
            "lora",
            lora={"r": 4, "alpha": 8, "dropout": 0.1},
            checkpoint={"every": 6, "keep_last": 5},
        )
    )
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000006", tmp_path / "b" / "checkpoints" / "step-00000006")
    got = train(
        _cfg(corpus, base_dir, tmp_path / "b", "lora", lora={"r": 4, "alpha": 8, "dropout": 0.1}, resume="auto")
    )
    assert len(got.losses) == 20
    assert max(abs(a - b) for a, b in zip(ref.losses, got.losses)) <= 1e-6  # dropout RNG restored too


def test_qlora_trains_close_to_lora(base, tmp_path):
    pytest.importorskip("bitsandbytes")
    corpus, base_dir = base
    lo = train(_cfg(corpus, base_dir, tmp_path / "lora", "lora"))
    q = train(_cfg(corpus, base_dir, tmp_path / "qlora", "qlora"))
    assert all(math.isfinite(x) for x in q.losses)
    assert sum(q.losses[-3:]) < 0.85 * sum(q.losses[:3])
    assert abs(q.losses[0] - lo.losses[0]) < 0.05 * lo.losses[0]  # NF4 base: close to the fp32 base
    cfg = json.loads((tmp_path / "qlora" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16


def test_full_finetune_exports_hf_dir(base, tmp_path):
    corpus, base_dir = base
    r = train(_cfg(corpus, base_dir, tmp_path / "run", "full", optim={"lr": 3e-3, "warmup_steps": 2}))
    assert sum(r.losses[-3:]) < 0.85 * sum(r.losses[:3])
    from yunque.formats.hf import load_model

    ours = load_model(tmp_path / "run" / "model").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), _hf_logits(hf, ids), atol=1e-5, rtol=1e-5)
