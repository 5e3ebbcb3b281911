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
from yunque.train.loop import Trainer, TrainResult

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


def estimate_memory(tr: Trainer) -> dict[str, float]:
    """Peak memory per process in GiB: weights, grads, AdamW moments, activations, loss chunk."""
    cfg, mc = tr.cfg, tr.model.config
    weights = sum(t.numel() * t.element_size() for t in (*tr.model.parameters(), *tr.model.buffers()))  # NF4 codes are buffers
    trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    world = tr.d.world if cfg.parallel == "fsdp" else 1
    B, T, Dm, F, L = cfg.micro_batch, cfg.data.seq_len, mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    act_bytes = 2 if cfg.precision == "bf16" else 4
    per_layer = B * T * (8 * Dm + 4 * F) * act_bytes + B * mc.num_attention_heads * T * T * act_bytes  # attention probs if unfused
    acts = (L * B * T * Dm * act_bytes + per_layer) if cfg.grad_checkpointing else L * per_layer
    chunk = min(max(64, (1 << 23) // mc.vocab_size), B * T) * mc.vocab_size * 4 * 2  # logits + softmax of one chunk
    est = {"weights": weights / world, "grads": trainable * 4 / world, "optimizer": trainable * 8 / world,
           "activations": acts, "loss": chunk}
    est["total"] = sum(est.values())
    return {k: v / (1 << 30) for k, v in est.items()}


def _gib(v: float) -> str:
    return f"{v:.2f} GiB" if v >= 0.1 else f"{v * 1024:.1f} MiB"


def dry_run(cfg: TrainConfig) -> str:
    from yunque.lora import trainable_parameters

    tr = Trainer(cfg, quiet=True)
    trainable, total = trainable_parameters(tr.model)
    mem = estimate_memory(tr)
    src = tr.data.train
    lines = ["# resolved config", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "",
             f"parameters: {trainable:,} trainable / {total:,} total ({100 * trainable / max(1, total):.2f}%)",
             f"data: {len(src):,} training documents, {src.num_targets():,} trained tokens, "
             f"{tr.packer.rows_per_epoch():,} rows of {cfg.data.seq_len} per epoch"
             + (f", {len(tr.data.val):,} validation documents" if tr.data.val is not None else ", no validation set"),
             f"steps: {tr.total_steps:,} x {tr.rows_per_step} rows ({tr.rows_per_step * cfg.data.seq_len:,} tokens per step)",
             "peak memory estimate (per process): " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items()), ""]
    for i in range(min(2, len(src))):
        ids, mask = src.doc(i)
        lines += [f"--- training example {i + 1} ({len(ids)} tokens; ⟦masked⟧ tokens are not trained)", _mark(tr.tok, ids, mask)]
    return "\n".join(lines)


def train_cmd(config: Path, *overrides: str, dry_run: bool = False, resume: bool = False, verify_data: bool = True) -> int:
    """Train a model: pretrain, full fine-tune, LoRA or QLoRA, as the config says.

    Args:
        config: the training config (YAML)
        overrides: key=value settings over the config (e.g. optim.lr=2.0e-4 parallel=ddp)
        dry_run: validate, print the resolved config, parameters, memory estimate and two examples, then exit
        resume: continue from the newest complete checkpoint in out_dir (same as resume=auto)
        verify_data: verify the prepared data against its manifest before training
    """
    cfg = load_config(TrainConfig, config, overrides)
    if resume:
        cfg.resume = "auto"
    if not verify_data:
        cfg.verify_data = False
    if dry_run:
        print(globals()["dry_run"](cfg))
        return 0
    r = train(cfg)
    if r.run_json is not None:
        best = f", best val_loss {r.best['val_loss']:.4f} at step {r.best_step} ({r.best_checkpoint})" if r.best else ""
        print(f"trained {r.steps} steps{' (early stop)' if r.stopped_early else ''}{best}; output {r.output}; {r.run_json}")
    return 0


if __name__ == "__main__":
    from yunque.cli import call_with_argv
    from yunque.errors import YunqueError

    try:
        sys.exit(call_with_argv(train_cmd, sys.argv[1:], prog="yunque train") or 0)
    except YunqueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
