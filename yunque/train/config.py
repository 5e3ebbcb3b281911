"""The typed, strict configuration of `yunque train` (one tree for every method).

A YAML file gives only what differs from these defaults; `key=value` overrides address
nested fields with dots (`optim.lr=2.0e-4`, `lora.r=8`, `parallel=ddp`). Cross-field rules
live in the `validate()` methods and name the field they reject.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from yunque.errors import ConfigError
from yunque.lora import LoraConfig

Method = Literal["pretrain", "full", "lora", "qlora"]
ADAPTER_METHODS = ("lora", "qlora")  # train only adapters over a frozen base; their output is a PEFT directory


def uses_adapter(method: str) -> bool:
    return method in ADAPTER_METHODS


@dataclass
class ModelSection:
    preset: str | None = None  # pretrain: a yunque.presets name ("tiny", "small", "base", ...)
    path: Path | None = None  # full / lora / qlora: a Hugging Face model directory
    overrides: dict[str, Any] = field(default_factory=dict)  # pretrain: ModelConfig fields over the preset
    dtype: Literal["float32", "bfloat16"] = "float32"  # storage of the trained weights (fp32 master weights by default)


@dataclass
class DataSection:
    dir: Path | None = None  # a `yunque data prepare` output: train.jsonl / val.jsonl + manifest.json
    train: list[Path] = field(default_factory=list)  # or raw .txt / .jsonl files (text, chat, completion records)
    val: list[Path] = field(default_factory=list)
    val_fraction: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})  # hold out the tail of raw train text
    seq_len: int = field(default=512, metadata={"gt": 1})
    pack: Literal["auto", "split", "whole"] = "auto"  # auto: split for pretrain, whole documents for fine-tuning
    shuffle: bool = True
    train_on_prompt: bool = False  # fine-tuning: also learn the prompt / user turns
    add_bos: bool = True
    add_eos: bool = True


@dataclass
class OptimSection:
    lr: float = field(default=3e-4, metadata={"gt": 0})
    weight_decay: float = field(default=0.1, metadata={"ge": 0})
    beta1: float = field(default=0.9, metadata={"ge": 0, "lt": 1})
    beta2: float = field(default=0.95, metadata={"ge": 0, "lt": 1})
    eps: float = field(default=1e-8, metadata={"gt": 0})
    # Warmup: warmup_steps when given (it wins, as in Hugging Face's TrainingArguments), else
    # warmup_ratio of the run's steps, rounded up; a fraction keeps warmup sized to the data.
    warmup_ratio: float = field(default=0.03, metadata={"ge": 0, "lt": 1})
    warmup_steps: int | None = field(default=None, metadata={"ge": 0})
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = field(default=0.1, metadata={"ge": 0, "le": 1})  # the floor of the decay, times lr
    grad_clip: float = field(default=1.0, metadata={"ge": 0})  # 0: off

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(round(self.warmup_ratio * total_steps, 9))  # 0.07 * 100 is 7.000000000000001, not 8 steps


@dataclass
class EvalSection:
    every: int = field(default=100, metadata={"ge": 0})  # steps; 0: only at the end
    max_batches: int = field(default=0, metadata={"ge": 0})  # 0: the whole validation set
    patience: int = field(
        default=0, metadata={"ge": 0}
    )  # early stopping after this many evals without improvement; 0: off
    min_delta: float = field(default=0.0, metadata={"ge": 0})


@dataclass
class CheckpointSection:
    every: int = field(default=200, metadata={"ge": 0})  # steps; 0: only best / final
    keep_last: int = field(default=2, metadata={"ge": 1})


@dataclass
class LogSection:
    every: int = field(default=10, metadata={"gt": 0})
    mlflow: bool = False
    mlflow_uri: str | None = None  # default: sqlite:///OUT_DIR/mlflow.db, artifacts in OUT_DIR/mlartifacts
    tensorboard: bool = False
    plot: bool = True


@dataclass
class PrivacySection:
    """DP-SGD (yunque/train/privacy.py): on when target_epsilon or noise_multiplier is given (exactly one).

    The privacy unit is one training record; under DP a row holds one record (see the README)."""

    target_epsilon: float | None = field(default=None, metadata={"gt": 0})  # the noise is chosen to end the run here
    noise_multiplier: float | None = field(default=None, metadata={"ge": 0})  # sigma; the final epsilon follows
    delta: float | Literal["auto"] = "auto"  # auto: 1 / n_records^1.1; must be below 1 / n_records
    max_grad_norm: float = field(default=1.0, metadata={"ge": 0})  # per-record clipping bound C; 0: off (needs sigma 0)
    accountant: Literal["prv", "rdp"] = "prv"
    max_epsilon: float | None = field(default=None, metadata={"gt": 0})  # stop cleanly before the budget is exceeded
    # hooks: per-record gradients of LoRA weights from each adapter's input and output gradient, a batch at
    # a time; loop: one backward per record (any method, any module). auto: hooks where they apply.
    per_sample: Literal["auto", "hooks", "loop"] = "auto"
    # The Poisson sampling and the noise are drawn from a secret made at the start of the run (kept in the
    # checkpoints for exact resume, never in run.json). A seed here makes the run reproducible instead: an
    # adversary who knows it can remove the noise, so it is for tests and benchmarks only.
    seed: int | None = field(default=None, metadata={"ge": 0})

    @property
    def enabled(self) -> bool:
        return self.target_epsilon is not None or self.noise_multiplier is not None

    def validate(self) -> None:
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ConfigError("privacy.noise_multiplier: give target_epsilon or noise_multiplier, not both")
        if not self.enabled and self.max_epsilon is not None:
            raise ConfigError("privacy.max_epsilon: needs privacy.target_epsilon or privacy.noise_multiplier")
        if self.delta != "auto" and not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta: must be in (0, 1), got {self.delta!r}")
        if self.max_grad_norm == 0 and self.noise_multiplier != 0:
            raise ConfigError(
                "privacy.max_grad_norm: 0 (no clipping) bounds no record's influence: only with "
                "noise_multiplier 0, which checks the DP step against normal training"
            )


@dataclass
class TrainConfig:
    method: Method = "pretrain"
    out_dir: Path = Path("runs/train")
    seed: int = field(default=1234, metadata={"ge": 0, "lt": 2**32})  # numpy seeds are 32-bit
    tokenizer: Path | None = None  # default: data.dir/tokenizer (what the shards were made with), else model.path
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraConfig = field(default_factory=LoraConfig)  # lora / qlora; quantize_base comes from the method
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)  # DP-SGD; off by default
    micro_batch: int = field(default=4, metadata={"gt": 0})  # rows per rank per micro-step
    grad_accum: int = field(default=1, metadata={"gt": 0})
    max_steps: int = field(default=0, metadata={"ge": 0})  # 0: from epochs
    epochs: float = field(default=1.0, metadata={"gt": 0})
    max_time: float = field(default=0.0, metadata={"ge": 0})  # seconds of training; 0: no limit
    # A step whose loss or gradient norm is NaN/Inf (on any rank) is never applied. 0: training stops
    # there (exit 3; the last good checkpoint is kept, nothing is exported). N: up to N such steps in a
    # row are skipped (gradients dropped, no optimizer update; the step still counts, for the schedule,
    # the data position and max_steps) and logged in metrics.jsonl as kind "nonfinite"; the next stops.
    max_bad_steps: int = field(default=0, metadata={"ge": 0})
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast over fp32 master weights
    grad_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: DDP when torchrun started several processes, else none. none under torchrun is refused:
    # it would train unsynchronised copies. FSDP shards parameters, not buffers: a QLoRA base
    # (NF4 buffers) stays whole on every rank while its adapter, embeddings and head are sharded.
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    resume: Literal["never", "auto"] = "never"  # auto: continue from the newest complete checkpoint
    overwrite: bool = False  # start over in an out_dir with checkpoints (they and run.json are deleted); else an error
    verify_data: bool = True
    base_model_name: str | None = None  # written into the PEFT adapter config (default: model.path)

    def __post_init__(self) -> None:
        # The resolved config (dry-run, run.json, checkpoints) shows the base that is trained over.
        if self.method == "qlora" and not self.lora.quantize_base:
            self.lora = dataclasses.replace(self.lora, quantize_base=True)

    def validate(self) -> None:
        if self.method == "pretrain":
            if self.model.preset is None:
                raise ConfigError("model.preset: required for method pretrain (e.g. tiny, small, base)")
            if self.model.path is not None:
                raise ConfigError(
                    "model.path: method pretrain starts from random weights; use method full to continue a checkpoint"
                )
            if self.tokenizer is None and self.data.dir is None:
                raise ConfigError("tokenizer: required for method pretrain (the tokenizer directory of the data step)")
        else:
            if self.model.path is None:
                raise ConfigError(f"model.path: required for method {self.method} (a Hugging Face model directory)")
            if self.model.preset is not None or self.model.overrides:
                raise ConfigError(f"model.preset: only for method pretrain, not {self.method}")
        if self.data.dir is None and not self.data.train:
            raise ConfigError("data.dir: give a prepared data directory or data.train files")
        if self.data.dir is not None and (self.data.train or self.data.val):
            raise ConfigError("data.train: give either data.dir or data.train/data.val files, not both")
        if self.trains_adapter and self.model.dtype == "bfloat16" and self.precision == "fp32":
            raise ConfigError("precision: bf16 base weights need precision bf16")
        if self.lora.quantize_base and self.method != "qlora":
            raise ConfigError(
                f"lora.quantize_base: set by the method; method {self.method} trains over the base as "
                "loaded (method qlora stores it in NF4)"
            )
        if self.lora.double_quant and self.method != "qlora":
            raise ConfigError(f"lora.double_quant: only applies to method qlora, not {self.method}")
        if self.resume == "auto" and self.overwrite:
            raise ConfigError("overwrite: contradicts resume: auto (continue the run, or start over, not both)")
        if self.eval.patience and self.eval.every == 0:
            raise ConfigError("eval.every: early stopping (eval.patience) needs periodic evaluation")
        if self.privacy.enabled:
            if self.method == "pretrain":
                raise ConfigError("privacy: DP-SGD is for fine-tuning (method full, lora or qlora), not pretrain")
            if self.parallel in ("ddp", "fsdp"):
                raise ConfigError(f"privacy: DP-SGD runs in one process here, not with parallel {self.parallel}")

    @property
    def trains_adapter(self) -> bool:
        return uses_adapter(self.method)

    @property
    def adapter(self) -> LoraConfig:
        """The adapter this run trains: the `lora` section, over an NF4 base for method qlora."""
        return dataclasses.replace(self.lora, quantize_base=self.method == "qlora")

    def step_warnings(self, total_steps: int, has_val: bool = True) -> list[str]:
        """Intervals this config sets that a run of `total_steps` steps never reaches (said, not refused)."""
        out = []
        o, ev, ck = self.optim, self.eval, self.checkpoint
        warmup = o.warmup(total_steps)
        if warmup > total_steps:
            out.append(
                f"optim.warmup_steps: {warmup} warmup steps but the run has {total_steps}: the learning rate "
                f"never reaches optim.lr (optim.warmup_ratio sizes warmup to the run)"
            )
        if has_val and ev.every > total_steps:
            out.append(f"eval.every: {ev.every} but the run has {total_steps} steps: validation runs once, at the end")
        if has_val and ev.patience and ev.every:
            evals = total_steps // ev.every + (total_steps % ev.every > 0)
            if evals <= ev.patience:
                out.append(
                    f"eval.patience: {ev.patience} evaluations without improvement stop the run, but it evaluates "
                    f"{evals} time{'s' * (evals != 1)}: early stopping cannot trigger"
                )
        if ck.every > total_steps:
            then = "only from the checkpoint of its best evaluation" if has_val else "not at all"
            out.append(
                f"checkpoint.every: {ck.every} but the run has {total_steps} steps: no periodic checkpoint; "
                f"an interrupted run can be resumed {then}"
            )
        return out

    @property
    def split_docs(self) -> bool:
        return self.data.pack == "split" or (self.data.pack == "auto" and self.method == "pretrain")
