"""`yunque train CONFIG.yaml [key=value ...]`: pretraining and full / LoRA / QLoRA fine-tuning.

The Python API is `train(cfg) -> TrainResult` with a `TrainConfig`; the command loads the
YAML strictly, applies the overrides and calls it. Under torchrun every process runs this.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from yunque.config import load_config, to_dict
from yunque.train.config import TrainConfig
from yunque.train.loop import Trainer
from yunque.train.outputs import TrainResult

__all__ = ["TrainConfig", "TrainResult", "train", "train_cmd", "dry_run"]


def train(cfg: TrainConfig) -> TrainResult:
    """Train as `cfg` says; returns losses, metrics, best checkpoint and output paths."""
    from yunque.train import distributed as D

    try:
        return Trainer(cfg).run()
    finally:
        D.shutdown()


def _mark(tok, ids, mask) -> str:
    """Decoded text with the tokens the model does not learn wrapped in ⟦ ⟧."""
    out, run, cur = [], [], None
    for i, t in enumerate(ids):
        trained = bool(mask is None or mask[i]) and i > 0  # the first token is never a target
        if trained != cur and run:
            text = tok.decode(run)
            out.append(text if cur else f"⟦{text}⟧")
            run = []
        cur = trained
        run.append(int(t))
    if run:
        text = tok.decode(run)
        out.append(text if cur else f"⟦{text}⟧")
    return "".join(out)


def _gib(v: float) -> str:
    return f"{v:.2f} GiB" if v >= 0.1 else f"{v * 1024:.1f} MiB"


def dry_run(cfg: TrainConfig) -> str:
    from yunque.lora import trainable_parameters
    from yunque.train.memory_estimate import estimate_memory

    tr = Trainer(cfg, quiet=True)
    trainable, total = trainable_parameters(tr.model)
    mem = estimate_memory(tr.model, cfg, tr.d.world)
    src = tr.data.train
    lines = [
        "# resolved config",
        yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(),
        "",
        f"parameters: {trainable:,} trainable / {total:,} total ({100 * trainable / max(1, total):.2f}%)",
        f"data: {len(src):,} training documents, {src.num_targets():,} trained tokens, "
        f"{tr.packer.rows_per_epoch():,} rows of {cfg.data.seq_len} per epoch"
        + (f", {len(tr.data.val):,} validation documents" if tr.data.val is not None else ", no validation set"),
        (
            f"steps: {tr.total_steps:,} x {tr.rows_per_step} rows ({tr.rows_per_step * cfg.data.seq_len:,} tokens per step), "  # noqa: E501
            if tr.dp is None
            else f"steps: {tr.total_steps:,} x {tr.rows_per_step} records expected (one per row, Poisson-sampled), "
        )
        + f"warmup {tr.warmup_steps:,}"
        + ("" if cfg.optim.warmup_steps is not None else f" ({cfg.optim.warmup_ratio:g} of the steps)"),
        *(tr.dp.describe() if tr.dp is not None else ()),  # DP-SGD: noise, sampling rate, steps, final ε
        *(f"warning: {w}" for w in cfg.step_warnings(tr.total_steps, has_val=tr.data.val is not None)),
        "peak memory estimate (per process): " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items()),
        "",
    ]
    for i in range(min(2, len(src))):
        ids, mask = src.doc(i)
        lines += [
            f"--- training example {i + 1} ({len(ids)} tokens; ⟦masked⟧ tokens are not trained)",
            _mark(tr.tok, ids, mask),
        ]
    return "\n".join(lines)


def train_cmd(
    config: Path,
    *overrides: str,
    dry_run: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    verify_data: bool = True,
) -> int:
    """Train a model: pretrain, full fine-tune, LoRA or QLoRA, as the config says.

    Args:
        config: the training config (YAML)
        overrides: key=value settings over the config (e.g. optim.lr=2.0e-4 parallel=ddp)
        dry_run: validate, print the resolved config, parameters, steps and warmup, warnings (intervals the run
            never reaches), memory estimate and two examples (with privacy: the noise multiplier, sampling rate,
            steps and the ε the run ends at), then exit
        resume: continue from the newest complete checkpoint in out_dir (same as resume=auto)
        overwrite: start over in an out_dir that holds an earlier run's checkpoints, deleting them and its run.json
            (same as overwrite=true)
        verify_data: verify the prepared data against its manifest before training
    """
    cfg = load_config(TrainConfig, config, overrides)
    if resume:
        cfg.resume = "auto"
    if overwrite:
        cfg.overwrite = True
    cfg.validate()  # the flags are config fields too (resume with overwrite is an error)
    if not verify_data:
        cfg.verify_data = False
    if dry_run:
        print(globals()["dry_run"](cfg))
        return 0
    r = train(cfg)
    if r.run_json is not None:
        best = f", best val_loss {r.best['val_loss']:.4f} at step {r.best_step} ({r.best_checkpoint})" if r.best else ""
        print(
            f"trained {r.steps} steps{' (early stop)' if r.stopped_early else ''}{best}; output {r.output}; {r.run_json}"  # noqa: E501
        )
    return 0


if __name__ == "__main__":
    from yunque.cli import call_with_argv
    from yunque.errors import YunqueError

    try:
        sys.exit(call_with_argv(train_cmd, sys.argv[1:], prog="yunque train") or 0)
    except YunqueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
