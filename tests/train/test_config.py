"""Strict training config: every error names its key before any work; --dry-run shows what would run."""

from __future__ import annotations

import pytest

from train_util import one_thread, make_corpus, pretrain_cfg, run_cli, write_cfg
from yunque.config import load_config
from yunque.errors import ConfigError
from yunque.train.config import TrainConfig

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=0.1", "optim.lrr: unknown key"),
    ("optim.lr=0", "optim.lr: must be > 0"),
    ("optim.lr=-1.0e-4", "optim.lr: must be > 0"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("lora.r=0", "lora.r: must be > 0"),
    ("lora.dropout=1.5", "lora.dropout: must be < 1"),
    ("lora.target_modules=[]", "lora.target_modules: must name at least one"),
    ("lora.targets=[q_proj]", "lora.targets: unknown key (known keys: alpha, block_size, double_quant, dropout, "
                              "quantize_base, r, target_modules"),
    ("lora.block_size=100", "lora.block_size: must be one of"),
    ("lora.double_quant=true", "lora.double_quant: only applies to method qlora"),
    ("lora.quantize_base=true", "lora.quantize_base: set by the method"),
    ("optim.warmup_ratio=1.0", "optim.warmup_ratio: must be < 1"),
    ("overwrite=true resume=auto", "overwrite: contradicts resume: auto"),
    ("micro_batch=0", "micro_batch: must be > 0"),
    ("micro_batch=2.5", "micro_batch: expected an integer"),
    ("precision=fp16", "precision: expected one of 'fp32' | 'bf16'"),
    ("parallel=tp", "parallel: expected one of"),
    ("data.seq_len=1", "data.seq_len: must be > 1"),
    ("data.val_fraction=1.0", "data.val_fraction: must be < 1.0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio: must be <= 1"),
    ("eval.patience=-1", "eval.patience: must be >= 0"),
    ("grad_checkpointing=maybe", "grad_checkpointing: expected true or false"),
    ("method=rlhf", "method: expected one of"),
    ("model.preset=null", "model.preset: required for method pretrain"),
    ("tokenizer=null", "tokenizer: required for method pretrain"),
    ("method=lora", "model.path: required for method lora"),
    ("eval.every=0", "eval.every: early stopping"),
])
def test_config_errors_name_the_key(tmp_path, data, override, key):
    cfg = write_cfg(tmp_path / "c.yaml", pretrain_cfg(data, tmp_path / "run", eval={"patience": 2}))
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, cfg, override.split())
    assert key in str(e.value)


def test_yaml_error_gives_file_and_line(tmp_path, data):
    cfg = write_cfg(tmp_path / "c.yaml", pretrain_cfg(data, tmp_path / "run", optim={"lr": 0}))
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, cfg)
    assert str(cfg) in str(e.value) and "optim.lr: must be > 0" in str(e.value)


def test_qlora_fsdp_rejected(tmp_path):
    with pytest.raises(ConfigError, match="parallel: fsdp is not supported with method qlora"):
        load_config(TrainConfig, None, ["method=qlora", f"model.path={tmp_path}", f"data.train=[{tmp_path}/x]", "parallel=fsdp"])


def test_cli_error_is_one_line_no_traceback(tmp_path, data):
    cfg = write_cfg(tmp_path / "c.yaml", pretrain_cfg(data, tmp_path / "run"))
    p = run_cli([str(cfg), "optim.lr=0"])
    assert p.returncode == 2
    assert "error:" in p.stderr and "optim.lr: must be > 0" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()  # nothing was done


def test_dry_run_prints_and_does_not_train(tmp_path, data, capsys):
    from yunque.recipes.train import train_cmd

    cfg = write_cfg(tmp_path / "c.yaml", pretrain_cfg(data, tmp_path / "run"))
    assert train_cmd(cfg, "data.train=[" + str(data["sft"]) + "]", "data.val_fraction=0.2", dry_run=True) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "method: pretrain" in out
    assert "trainable /" in out and "peak memory estimate" in out and "total" in out
    assert out.count("--- training example") == 2
    assert "⟦" in out and "add " in out  # the masked prompt is marked, the completion is not
    example = out.split("--- training example 1")[1].split("\n", 1)[1].split("---")[0]
    assert example.index("⟦") < example.index("=⟧")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["pretrain-small", "lora-llama3", "qlora-llama3", "full-finetune"])
def test_shipped_configs_load(name):
    from train_util import ROOT

    cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml")
    if name.startswith(("lora", "qlora")):
        assert (cfg.lora.r, cfg.lora.alpha, cfg.optim.lr, cfg.optim.schedule, cfg.epochs, cfg.grad_checkpointing) == \
            (16, 32.0, 1e-4, "cosine", 3.0, True)


def test_early_stopping_without_validation_data_is_an_error(tmp_path, data):
    from yunque.config import from_dict
    from yunque.recipes.train import train

    cfg = from_dict(TrainConfig, pretrain_cfg(data, tmp_path / "run", data={"val_fraction": 0.0}, eval={"every": 2, "patience": 2}))
    with pytest.raises(ConfigError, match="eval.patience: early stopping needs validation data"):
        train(cfg)
