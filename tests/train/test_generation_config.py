"""Every model directory yunque writes (training's export, quantize, merge) lists all its stop ids
in generation_config.json: EOS and the chat template's end of turn, so transformers (and vLLM,
which reads the same file) stop at <|eot_id|> instead of running past it."""

from __future__ import annotations

import json
import shutil

import pytest
from train_util import make_corpus, one_thread, pretrain_cfg

from yunque.config import from_dict
from yunque.recipes.train import train
from yunque.tokenizer import EOS, EOT, Tokenizer
from yunque.train.config import TrainConfig

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("gencfg")
    corpus = make_corpus(d / "corpus", n_lines=60)
    cfg = pretrain_cfg(corpus, d / "run", max_steps=2, eval={"every": 0}, checkpoint={"every": 0})
    r = train(from_dict(TrainConfig, cfg))
    return r.output


def _eos_ids(model_dir) -> list[int]:
    transformers = pytest.importorskip("transformers")
    eos = transformers.GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    return eos if isinstance(eos, list) else [eos]


def test_pretraining_writes_every_stop_id(trained):
    tok = Tokenizer.from_dir(trained)
    stops = [tok.token_to_id(EOS), tok.token_to_id(EOT)]
    assert tok.stop_ids == stops
    assert _eos_ids(trained) == stops


def test_quantize_and_merge_add_the_tokenizers_stop_ids(trained, tmp_path):
    """A source whose generation_config.json names only EOS (as many hub models do) gets the rest."""
    import torch

    from yunque.formats.hf import load_model
    from yunque.formats.peft import merge_adapter, save_peft_adapter
    from yunque.lora import LoraConfig, apply_lora
    from yunque.recipes.quantize import quantize_cmd

    src = tmp_path / "src"
    shutil.copytree(trained, src)
    tok = Tokenizer.from_dir(src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id(EOS), "top_p": 0.9}))
    stops = [tok.token_to_id(EOS), tok.token_to_id(EOT)]

    quantize_cmd(str(src), bits=8, out=tmp_path / "q8")
    assert _eos_ids(tmp_path / "q8") == stops
    assert json.loads((tmp_path / "q8" / "generation_config.json").read_text())["top_p"] == 0.9  # the rest is kept

    model = load_model(src)
    apply_lora(model, LoraConfig(r=2), generator=torch.Generator().manual_seed(0))
    save_peft_adapter(model, tmp_path / "adapter", LoraConfig(r=2), str(src))
    merge_adapter(src, tmp_path / "adapter", tmp_path / "merged")
    assert _eos_ids(tmp_path / "merged") == stops
