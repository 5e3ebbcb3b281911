"""Strict training config: every error names its key before any work; --dry-run shows what would run."""

from __future__ import annotations

import pytest
from train_util import make_corpus, one_thread, pretrain_cfg, run_cli, write_cfg

from yunque.config import load_config
from yunque.errors import ConfigError
from yunque.train.config import TrainConfig

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=0.1", "optim.lrr: unknown key"),
        ("optim.lr=0", "optim.lr: must be > 0"),
        ("optim.lr=-1.0e-4", "optim.lr: must be > 0"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("lora.r=0", "lora.r: must be > 0"),
        ("lora.dropout=1.5", "lora.dropout: must be < 1"),
        ("lora.target_modules=[]", "lora.target_modules: must name at least one"),
        (
            "lora.targets=[q_proj]",
            "lora.targets: unknown key (known keys: alpha, block_size, double_quant, dropout, "
            "quantize_base, r, target_modules",
        ),
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
    ],
)
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
        assert (cfg.lora.r, cfg.lora.alpha, cfg.optim.lr, cfg.optim.schedule, cfg.epochs, cfg.grad_checkpointing) == (
            16,
            32.0,
            1e-4,
            "cosine",
            3.0,
            True,
        )


def test_early_stopping_without_validation_data_is_an_error(tmp_path, data):
    from yunque.config import from_dict
    from yunque.recipes.train import train

    cfg = from_dict(
        TrainConfig, pretrain_cfg(data, tmp_path / "run", data={"val_fraction": 0.0}, eval={"every": 2, "patience": 2})
    )
    with pytest.raises(ConfigError, match="eval.patience: early stopping needs validation data"):
        train(cfg)


def test_one_lora_config_and_one_adapter_rule(tmp_path):
    from yunque.lora import LoraConfig
    from yunque.train.config import uses_adapter

    common = [f"model.path={tmp_path}", f"data.train=[{tmp_path}/x]"]
    q = load_config(TrainConfig, None, ["method=qlora", "lora.double_quant=true", *common])
    assert type(q.lora) is LoraConfig and q.lora.quantize_base and q.adapter.quantize_base and q.adapter.double_quant
    lo = load_config(TrainConfig, None, ["method=lora", *common])
    assert not lo.adapter.quantize_base and lo.lora == LoraConfig()  # the library's defaults are the config's
    assert [m for m in ("pretrain", "full", "lora", "qlora") if uses_adapter(m)] == ["lora", "qlora"]
    assert (
        q.trains_adapter
        and lo.trains_adapter
        and not load_config(TrainConfig, None, ["method=full", *common]).trains_adapter
    )


def test_warmup_ratio_by_default_and_warmup_steps_wins():
    from yunque.train.config import OptimSection

    assert OptimSection().warmup(1000) == 30 and OptimSection().warmup(2) == 1  # 3%, rounded up as in HF
    assert OptimSection(warmup_ratio=0.07).warmup(100) == 7  # not ceil(7.000000000000001)
    assert OptimSection(warmup_ratio=0.5, warmup_steps=7).warmup(1000) == 7
    assert OptimSection(warmup_steps=0).warmup(1000) == 0


def test_step_warnings_name_what_the_run_never_reaches():
    cfg = TrainConfig()
    cfg.optim.warmup_steps, cfg.eval.every, cfg.eval.patience, cfg.checkpoint.every = 50, 100, 5, 200
    ws = cfg.step_warnings(2)
    assert [w.split(":")[0] for w in ws] == ["optim.warmup_steps", "eval.every", "eval.patience", "checkpoint.every"]
    assert "50 warmup steps but the run has 2" in ws[0] and "evaluates 1 time:" in ws[2]
    assert [w.split(":")[0] for w in cfg.step_warnings(2, has_val=False)] == ["optim.warmup_steps", "checkpoint.every"]
    assert cfg.step_warnings(1200) == []
    cfg.optim.warmup_steps = None
    assert not any("warmup" in w for w in cfg.step_warnings(2))  # a ratio always fits the run


def test_dry_run_warns_when_intervals_exceed_the_run(tmp_path, data, capsys):
    from yunque.recipes.train import train_cmd

    cfg = write_cfg(
        tmp_path / "c.yaml",
        pretrain_cfg(
            data,
            tmp_path / "run",
            max_steps=0,
            epochs=1.0,
            micro_batch=16,
            optim={"warmup_steps": 50},
            eval={"every": 100, "patience": 5},
            checkpoint={"every": 200},
        ),
    )
    assert train_cmd(cfg, dry_run=True) == 0
    out = capsys.readouterr().out
    steps = int(out.split("\nsteps: ")[1].split(" ")[0])
    assert steps < 50
    for key in ("optim.warmup_steps", "eval.every", "eval.patience", "checkpoint.every"):
        assert f"\nwarning: {key}: " in out, key
    assert train_cmd(cfg, "optim.warmup_steps=null", dry_run=True) == 0
    out = capsys.readouterr().out
    assert f"warmup {-(-3 * steps // 100)} (0.03 of the steps)" in out and "warning: optim.warmup" not in out


def test_rerun_into_a_run_with_checkpoints_is_refused_without_resume_or_overwrite(tmp_path, data):
    cfg = write_cfg(tmp_path / "c.yaml", pretrain_cfg(data, tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000005"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 5, "kind": "train", "loss": 1.0}\n')
    p = run_cli([str(cfg)])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "out_dir:" in p.stderr and str(ckpt) in p.stderr and "--resume" in p.stderr and "--overwrite" in p.stderr
    assert (
        tmp_path / "run" / "metrics.jsonl"
    ).read_text() == '{"step": 5, "kind": "train", "loss": 1.0}\n'  # untouched
    p = run_cli([str(cfg), "--resume", "--overwrite"])
    assert p.returncode == 2 and "overwrite: contradicts resume: auto" in p.stderr
