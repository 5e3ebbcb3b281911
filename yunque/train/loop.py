"""One training loop for pretrain | full | lora | qlora, with exact resume.

`Trainer(cfg)` builds everything (tokenizer, data, model, optimizer, packer) without
training, which is what `--dry-run` inspects; `Trainer.run()` trains. Everything that
decides what step n computes (weights, optimizer moments, RNG, data position, schedule
step, early-stopping counters) is in the checkpoint, so a resumed run repeats the
uninterrupted run's losses exactly.

No NaN survives: a step whose loss or gradient norm is non-finite on any rank is not applied,
and stops the run (`max_bad_steps` of them in a row are skipped first); weights are checked
before every checkpoint and the export, so neither ever holds NaN or Inf.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from yunque.config import to_dict
from yunque.errors import CheckpointError, ConfigError, TrainingDiverged
from yunque.model import ModelConfig, Transformer
from yunque.ops import release_cpu_memory, tune_cpu_memory
from yunque.threads import ThreadPolicy
from yunque.tokenizer import Tokenizer
from yunque.train import distributed as D
from yunque.train.checkpoint import (
    flatten_optimizer,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optimizer,
)
from yunque.train.config import TrainConfig
from yunque.train.documents import load_data, resolve_tokenizer, token_bytes
from yunque.train.loss import CausalLMLoss
from yunque.train.outputs import TrainResult, write_outputs
from yunque.train.packing import Packer, fixed_batches
from yunque.train.step import eval_metrics, evaluate, lr_at, make_optimizer, set_lr, to_device, train_step
from yunque.train.tracking import Progress, Tracker

PREFIX = "model."  # CausalLMLoss holds the Transformer as `.model`


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, tok: Tokenizer) -> Transformer:
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    if cfg.method == "pretrain":
        from yunque.presets import get_preset

        known = {f.name for f in dataclasses.fields(ModelConfig)}
        for k in cfg.model.overrides:
            if k not in known:
                raise ConfigError(f"model.overrides.{k}: unknown model field (known: {', '.join(sorted(known))})")
        mc = get_preset(
            cfg.model.preset,
            **{
                "vocab_size": tok.vocab_size,
                "bos_token_id": tok.bos_id,
                "eos_token_id": tok.eos_id,
                "pad_token_id": tok.pad_id,
                **cfg.model.overrides,
            },
        )  # overrides win
        from yunque.formats.model_limits import check_fits, checked

        mc = checked(mc, "model.overrides", ConfigError)  # before a byte is allocated: types, ranges, memory
        if mc.vocab_size < tok.vocab_size:
            raise ConfigError(
                f"model.overrides.vocab_size: {mc.vocab_size} is below the tokenizer's {tok.vocab_size} tokens"
            )
        check_fits(
            mc,
            dtype.itemsize + 12,
            f"model.preset {cfg.model.preset}",
            error=ConfigError,
            what="training it (weights, fp32 gradients and AdamW moments)",
        )
        model = Transformer(mc)
        model.init_weights(generator=torch.Generator().manual_seed(cfg.seed))
        model.to(dtype)
    else:
        from yunque.formats.hf import load_model

        model = load_model(cfg.model.path, dtype=dtype)
        if model.config.vocab_size < tok.vocab_size:
            raise ConfigError(
                f"tokenizer: {tok.vocab_size} tokens but the model has {model.config.vocab_size} embeddings"
            )
        if cfg.trains_adapter:
            from yunque.lora import apply_lora

            apply_lora(model, cfg.adapter, generator=torch.Generator().manual_seed(cfg.seed))
            if cfg.precision == "bf16" and cfg.parallel != "fsdp":  # FSDP2 wants one dtype per group
                from yunque.lora import store_frozen_linears_

                store_frozen_linears_(model, torch.bfloat16)
    model.gradient_checkpointing = cfg.grad_checkpointing
    return model


def check_out_dir(cfg: TrainConfig) -> None:
    """Starting over where an earlier run left checkpoints needs resume or overwrite: it would replace that run's metrics."""  # noqa: E501
    found = latest_checkpoint(cfg.out_dir / "checkpoints")
    if found is not None and cfg.resume != "auto" and not cfg.overwrite:
        raise ConfigError(
            f"out_dir: {cfg.out_dir} holds checkpoint {found} of an earlier run; pass --resume to "
            "continue it, --overwrite to start over (its checkpoints and metrics are replaced), "
            "or choose another out_dir"
        )


class Trainer:
    def __init__(self, cfg: TrainConfig, *, quiet: bool = False):
        self.cfg = cfg
        check_out_dir(cfg)
        seed_everything(cfg.seed)
        device_type = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.d = D.init(cfg.parallel, device_type)
        self.device = D.device_for(self.d, cfg.device)
        if self.device.type == "cpu":
            tune_cpu_memory()
        if cfg.model.path is not None:  # a catalogue name (yunque models) becomes its converted directory
            from yunque.models import resolve_model

            cfg.model.path = resolve_model(cfg.model.path)
        self.tok = Tokenizer.from_dir(resolve_tokenizer(cfg))
        self.data = load_data(cfg, self.tok)
        if cfg.eval.patience and self.data.val is None:
            raise ConfigError(
                "eval.patience: early stopping needs validation data (data.val, data.val_fraction or a val split)"
            )
        self.model = build_model(cfg, self.tok).to(self.device)
        self.loss_module = CausalLMLoss(self.model)
        self.module = D.wrap(self.d, self.loss_module, self.model.model.layers, self.device)
        o = cfg.optim
        self.optimizer = make_optimizer(
            self.module, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps, fused=False if self.d.kind == "fsdp" else None
        )
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.packer = Packer(
            self.data.train,
            cfg.data.seq_len,
            split_docs=cfg.split_docs,
            shuffle=cfg.data.shuffle,
            seed=cfg.seed,
            pad_id=self.tok.pad_id or 0,
        )
        self.rows_per_step = cfg.micro_batch * self.d.world * cfg.grad_accum
        self.dp = self._privacy() if cfg.privacy.enabled else None  # DP-SGD: Poisson batches of single records
        if self.dp is not None:
            self.rows_per_step = self.dp.batch  # expected
            self.total_steps = cfg.max_steps or self.dp.steps_for(cfg.epochs)
            self.dp.plan(self.total_steps)
        else:
            self.total_steps = cfg.max_steps or max(
                1, math.ceil(cfg.epochs * self.packer.rows_per_epoch() / self.rows_per_step)
            )
        self.warmup_steps = cfg.optim.warmup(self.total_steps)
        self.quiet = quiet or not self.d.main
        self.ckpt_root = cfg.out_dir / "checkpoints"
        self.step = self.tokens = self.bad_evals = self.bad_steps = 0
        self._nonfinite: tuple[float, float] | None = None  # this step's (loss sum, grad norm) when not finite
        self.best: dict | None = None
        self.best_step: int | None = None
        self.losses: list[float] = []  # of the steps applied (a skipped NaN step has none)
        self.tracker: Tracker | None = None
        self.threads: ThreadPolicy | None = None
        self.lr = cfg.optim.lr

    def _privacy(self):
        from yunque.train.privacy import DPTraining

        if self.d.world > 1:
            raise ConfigError("privacy: DP-SGD runs in one process here; start it without torchrun")
        return DPTraining(self.cfg, self.data.train, self.model, self.device, self.tok.pad_id or 0)

    # ------------------------------------------------------------ checkpoints

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        if self.d.kind == "fsdp":
            sd = D.gather_model_state(self.module, PREFIX)
        else:
            sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if not self.cfg.trains_adapter or k in self.trainable}

    def save(self) -> Path | None:
        self.check_weights()
        tensors = self._model_tensors()
        osd = D.gather_optim_state(self.module, self.optimizer, PREFIX)
        path = None
        if self.d.main:
            opt_t, groups = flatten_optimizer(osd)
            rng_t, rng_meta = rng_state()
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "data": self.packer.state_dict(),
                "rng": rng_meta,
                "optimizer_groups": groups,
                "best": self.best,
                "best_step": self.best_step,
                "bad_evals": self.bad_evals,
                "bad_steps": self.bad_steps,
                "losses": self.losses,
                "world": self.d.world,
                "config": to_dict(self.cfg),
                "privacy": self.dp.state_dict() if self.dp is not None else None,
            }
            path = save_checkpoint(
                self.ckpt_root,
                self.step,
                {"model": tensors, "optimizer": opt_t, "rng": rng_t},
                state,
                keep_last=self.cfg.checkpoint.keep_last,
                best_step=self.best_step,
                extra=self._adapter_writer(tensors),
            )
        D.barrier(self.d)
        return path

    def _adapter_writer(self, tensors: dict[str, torch.Tensor]):
        """LoRA / QLoRA: a checkpoint is also a PEFT adapter directory (merge / generate / serve take it)."""
        if not self.cfg.trains_adapter:
            return None
        from yunque.formats.peft import save_peft_adapter

        base = self.cfg.base_model_name or str(self.cfg.model.path)
        return lambda d: save_peft_adapter(self.model, d, self.cfg.adapter, base, tensors=tensors)

    def _load_model(self, path: Path, msd: dict[str, torch.Tensor]) -> None:
        if self.d.kind == "fsdp":
            D.set_model_state(self.module, PREFIX, msd)
        else:
            bad = self.model.load_state_dict(msd, strict=False).unexpected_keys
            if bad:
                raise CheckpointError(f"{path}: model.safetensors has keys the model lacks: {bad[:3]}")

    def restore_best(self, progress: Progress) -> int:
        """Early stopping: put the best evaluation's weights back for export; returns the step they are from."""
        path = self.ckpt_root / f"step-{self.best_step:08d}"
        if not (path / "state.json").is_file():
            progress.message(
                f"warning: the best step's checkpoint {path} is gone; exporting the last weights (step {self.step})"
            )
            return self.step
        files, _ = load_checkpoint(path)
        self._load_model(path, files["model"])
        progress.message(
            f"exporting the best weights: step {self.best_step} (val_loss {self.best['val_loss']:.4f}), "
            f"not the last step {self.step}"
        )
        return self.best_step

    def resume(self) -> Path | None:
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            return None
        files, state = load_checkpoint(path)
        if state["config"]["method"] != self.cfg.method:
            raise CheckpointError(f"{path}: written by method {state['config']['method']}, not {self.cfg.method}")
        missing = (set(self.trainable) if self.cfg.trains_adapter else set()) - set(files["model"])
        if missing:
            raise CheckpointError(f"{path}: model.safetensors lacks {sorted(missing)[:3]}")
        self._load_model(path, files["model"])
        D.set_optim_state(
            self.module, self.optimizer, PREFIX, unflatten_optimizer(files["optimizer"], state["optimizer_groups"])
        )
        set_rng_state(files["rng"], state["rng"])
        self.packer.load_state_dict(state["data"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]
        self.bad_steps = state.get("bad_steps", 0)  # absent from checkpoints of earlier versions
        self.losses = list(state["losses"])
        if self.dp is not None:  # the accountant's history: ε continues where the checkpoint left it
            self.dp.load_state_dict(state.get("privacy"), str(path))
        elif state.get("privacy"):
            raise CheckpointError(f"{path}: written by a DP-SGD run; resume it with its privacy section")
        return path

    # ------------------------------------------------------------ loop

    def _eval_batches(self):
        if self.data.val is None:
            return None
        rows, r = self.cfg.micro_batch, self.d.rank
        bs = fixed_batches(
            self.data.val,
            self.cfg.data.seq_len,
            rows * self.d.world,
            split_docs=self.cfg.split_docs,
            pad_id=self.tok.pad_id or 0,
        )
        if self.cfg.eval.max_batches:
            bs = bs[: self.cfg.eval.max_batches]
        return [to_device(b.rows(r * rows, (r + 1) * rows), self.device) for b in bs]

    def evaluate(self) -> dict | None:
        if self._val is None:
            return None
        sums = evaluate(self.module, self._val, self._byte_len, self.cfg.precision)
        return eval_metrics(D.all_reduce_sum(self.d, sums.to(self.device)))

    def run(self) -> TrainResult:
        self._progress: Progress | None = None
        try:
            return self._run()
        finally:
            if self._progress is not None:  # a terminal's progress bar ends however training does
                self._progress.close()
            if self.tracker is not None:  # an error on the way: the MLflow run says so
                self.tracker.close("FAILED")
                self.tracker = None

    def _run(self) -> TrainResult:
        cfg, d = self.cfg, self.d
        resumed = self.resume() if cfg.resume == "auto" else None
        if self.d.main:
            if cfg.overwrite:  # what the earlier run's resume would read; metrics.jsonl is restarted below
                shutil.rmtree(self.ckpt_root, ignore_errors=True)
                (cfg.out_dir / "run.json").unlink(missing_ok=True)
            cfg.out_dir.mkdir(parents=True, exist_ok=True)
        D.barrier(d)
        self._val = self._eval_batches()
        self._byte_len = token_bytes(self.tok).to(self.device) if self._val else None
        self.tracker = tracker = Tracker(
            cfg.out_dir,
            enabled=d.main,
            mlflow=cfg.log.mlflow,
            mlflow_uri=cfg.log.mlflow_uri,
            tensorboard=cfg.log.tensorboard,
            params=to_dict(cfg),
            manifest=self.data.manifest,
            resume_step=self.step if resumed else None,
        )
        progress = self._progress = Progress(self.total_steps, self.step, not self.quiet)
        # On a CPU shared with other work, fewer threads than cores is several times faster (yunque/threads.py).
        self.threads = ThreadPolicy() if self.device.type == "cpu" and d.world == 1 else None
        if self.threads is not None:
            n = self.threads.start()
            progress.message(
                f"training on cpu with {n} thread{'s' if n > 1 else ''}"
                + (f" ({self.threads.others:.1f} cores busy with other work)" if self.threads.others >= 0.5 else "")
            )
        if resumed:
            progress.message(f"resumed from {resumed} at step {self.step}")
        for w in cfg.step_warnings(self.total_steps, has_val=self._val is not None):
            progress.message(f"warning: {w}")
        self.module.train()
        pending: list = []
        t_last, tok_last = time.perf_counter(), self.tokens
        t_start = time.perf_counter()
        stopped_early = stopped_budget = False
        while self.step < self.total_steps:
            if cfg.max_time and time.perf_counter() - t_start > cfg.max_time:
                break
            if self.dp is not None and self.dp.stop_step is not None and self.step >= self.dp.stop_step:
                stopped_budget = True
                eps = self.dp.epsilon()
                tracker.log(self.step, "privacy", {"epsilon": eps, "delta": self.dp.delta, "action": "stop"})
                progress.message(
                    f"privacy: stopping at step {self.step}: one more step would spend more than max_epsilon "
                    f"{cfg.privacy.max_epsilon:g} (ε {eps:.3f})"
                )
                break
            lr = lr_at(
                self.step,
                lr=cfg.optim.lr,
                warmup=self.warmup_steps,
                total=self.total_steps,
                schedule=cfg.optim.schedule,
                min_ratio=cfg.optim.min_lr_ratio,
            )
            set_lr(self.optimizer, lr)
            self.lr, self._nonfinite = lr, None
            if self.dp is None:
                loss_sum, norm, n_targets = self._step()
                self.tokens += self.rows_per_step * cfg.data.seq_len
            else:
                s = self.dp.step(self.step, self.module, self.optimizer, precision=cfg.precision, check=self._finite)
                loss_sum, norm, n_targets = s.loss_sum, s.grad_norm, s.n_targets
                self.tokens += s.tokens
            self.step += 1
            if self.threads is not None:
                self.threads.update()
            if self._nonfinite is None:
                self.bad_steps = 0
                pending.append((self.step, loss_sum, n_targets, lr, norm, self.tokens))
            else:
                if pending:  # metrics.jsonl stays in step order
                    self._flush(
                        pending, tracker, progress, (self.tokens - tok_last) / max(1e-9, time.perf_counter() - t_last)
                    )
                    pending, t_last, tok_last = [], time.perf_counter(), self.tokens
                self._nonfinite_step(n_targets, progress)  # raises past max_bad_steps
            do_eval = self._val is not None and (
                (cfg.eval.every and self.step % cfg.eval.every == 0) or self.step == self.total_steps
            )
            do_ckpt = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
            if pending and (self.step % cfg.log.every == 0 or do_eval or do_ckpt or self.step == self.total_steps):
                self._flush(
                    pending, tracker, progress, (self.tokens - tok_last) / max(1e-9, time.perf_counter() - t_last)
                )
                pending, t_last, tok_last = [], time.perf_counter(), self.tokens
            progress.tick(self.step)  # between log steps, a line every few seconds
            improved = False
            eps = self._log_epsilon(do_eval, progress) if self.dp is not None else None
            if do_eval:
                m = self.evaluate()
                tracker.log(self.step, "eval", m)
                progress.message(
                    f"eval step {self.step} | val_loss {m['val_loss']:.4f} | ppl {m['val_ppl']:.2f}"
                    + (f" | bpb {m['val_bpb']:.4f}" if "val_bpb" in m else "")
                    + (f" | ε {eps:.3f}" if eps is not None else "")
                )
                if self.best is None or m["val_loss"] < self.best["val_loss"] - cfg.eval.min_delta:
                    self.best, self.best_step, self.bad_evals, improved = m, self.step, 0, True
                else:
                    self.bad_evals += 1
                    stopped_early = bool(cfg.eval.patience) and self.bad_evals >= cfg.eval.patience
            if do_ckpt or improved or stopped_early:
                self.save()
            if stopped_early:
                progress.message(
                    f"early stopping at step {self.step}: no val_loss improvement > {cfg.eval.min_delta} "
                    f"in {self.bad_evals} evals; best {self.best['val_loss']:.4f} at step {self.best_step}"
                )
                break
        if pending:
            self._flush(pending, tracker, progress, (self.tokens - tok_last) / max(1e-9, time.perf_counter() - t_last))
        self.check_weights()  # the weights the export writes (or, under early stopping, a checked checkpoint's)
        final = {"train_loss": self.losses[-1] if self.losses else None, "steps": self.step, "tokens": self.tokens}
        last_eval = (
            self.evaluate() if self._val is not None and self.best_step != self.step and not stopped_early else None
        )
        if last_eval:
            tracker.log(self.step, "eval", last_eval)
            if self.best is None or last_eval["val_loss"] < self.best["val_loss"] - cfg.eval.min_delta:
                self.best, self.best_step = last_eval, self.step
        final.update(last_eval or (self.best if self.best_step == self.step else {}))
        tracker.close()
        self.tracker = None
        # Early stopping watches val_loss to keep the best weights: export those, not the last.
        exported = (
            self.restore_best(progress) if cfg.eval.patience and self.best_step not in (None, self.step) else self.step
        )
        result = TrainResult(
            cfg.out_dir,
            self.step,
            self.tokens,
            list(self.losses),
            final,
            self.best,
            self.best_step,
            stopped_early=stopped_early,
            exported_step=exported,
            privacy=self.dp.report(stopped_budget) if self.dp is not None else None,
        )
        # FSDP: the adapter is sharded DTensors; gather them (a collective, every rank) for the export.
        adapter_tensors = self._model_tensors() if self.d.kind == "fsdp" and cfg.trains_adapter else None
        write_outputs(
            cfg,
            result,
            model=self.model,
            module=self.module,
            tok=self.tok,
            d=d,
            manifest=self.data.manifest,
            ckpt_root=self.ckpt_root,
            adapter_tensors=adapter_tensors,
        )
        if result.run_json is not None:
            tracker.log_artifact(result.run_json)
        D.barrier(d)
        release_cpu_memory()  # this step's buffers, for a process that goes on (demo, notebooks)
        if self.threads is not None:
            self.threads.close()
        return result

    def _step(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """One optimizer step over packed rows: (this rank's loss sum, gradient norm, trained tokens of the step)."""
        cfg, d = self.cfg, self.d
        mb, r = cfg.micro_batch, d.rank
        micro, n_targets = [], 0
        for _ in range(cfg.grad_accum):
            b = self.packer.next_batch(mb * d.world)
            n_targets += b.num_targets
            micro.append(to_device(b.rows(r * mb, (r + 1) * mb), self.device))
        loss_sum, norm = train_step(
            self.module,
            self.optimizer,
            micro,
            n_targets,
            world=d.world,
            precision=cfg.precision,
            grad_clip=cfg.optim.grad_clip,
            no_sync=D.no_sync(d, self.module),
            params=self.params,
            recast_weights=d.kind != "fsdp",
            check=self._finite,
        )
        return loss_sum, norm, n_targets

    def _log_epsilon(self, do_eval: bool, progress: Progress) -> float | None:
        """DP: ε spent so far, logged at every eval step (every eval.every steps without validation data), and the last."""  # noqa: E501
        every = self.cfg.eval.every
        if not (do_eval or (every and self.step % every == 0) or self.step == self.total_steps):
            return None
        eps = self.dp.epsilon()
        shown = eps if math.isfinite(eps) else None  # JSON has no Infinity
        self.tracker.log(self.step, "privacy", {"epsilon": shown, "delta": self.dp.delta, **self.dp.take_stats()})
        if not do_eval:
            progress.message(f"privacy step {self.step} | ε {eps:.3f} (δ {self.dp.delta:.3g})")
        return eps

    # ------------------------------------------------------------ NaN / Inf

    def _finite(self, loss_sum: torch.Tensor, norm: torch.Tensor) -> bool:
        """train_step's check, before the update: are the step's loss and gradient norm finite on
        every rank? A NaN or Inf survives the sum, so all ranks get the same answer. One host sync."""
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor (collective)
        v = D.all_reduce_sum(self.d, torch.stack([loss_sum.float(), norm.float().to(loss_sum.device)]))
        if bool(torch.isfinite(v).all()):
            return True
        self._nonfinite = (float(v[0]), float(v[1]) / self.d.world)  # every rank had the same norm
        return False

    def _nonfinite_step(self, n_targets: int, progress: Progress) -> None:
        """A step that was not applied: logged, and past `max_bad_steps` in a row, the end of training."""
        self.bad_steps += 1
        loss, norm = self._nonfinite[0] / max(1, n_targets), self._nonfinite[1]
        why = ", ".join(
            f"{k} {v:.4g}" if math.isfinite(v) else f"{k} is {v}" for k, v in (("loss", loss), ("grad norm", norm))
        )
        stop = self.bad_steps > self.cfg.max_bad_steps
        row = {
            "loss": loss if math.isfinite(loss) else None,  # JSON has no NaN
            "grad_norm": norm if math.isfinite(norm) else None,
            "lr": self.lr,
            "in_a_row": self.bad_steps,
            "action": "stop" if stop else "skip",
        }
        if stop:
            n = self.cfg.max_bad_steps
            raise self._stop(
                f"step {self.step}: {why} (lr {self.lr:g}); "
                + (f"{self.bad_steps} such steps in a row, more than max_bad_steps {n}" if n else "not applied"),
                row,
            )
        self.tracker.log(self.step, "nonfinite", row)
        progress.message(
            f"warning: step {self.step}: {why} (lr {self.lr:g}); skipped, not applied "
            f"({self.bad_steps} in a row of max_bad_steps {self.cfg.max_bad_steps})"
        )

    def check_weights(self) -> None:
        """Before a checkpoint or the export: every rank checks its own trainable weights (its shards
        under FSDP) and all agree, so NaN or Inf is never written and no rank waits alone in a collective."""
        from yunque.formats.hf import first_nonfinite

        trained = ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        found = first_nonfinite((n, p.to_local() if hasattr(p, "to_local") else p) for n, p in trained)
        if float(D.all_reduce_sum(self.d, torch.tensor([float(found is not None)], device=self.device))[0]) == 0:
            return
        what = (
            f"tensor {found[0]} holds {found[1]} non-finite value(s) (NaN or Inf) of {found[2]}"
            if found
            else "a weight on another rank holds NaN or Inf"
        )
        raise self._stop(
            f"step {self.step}: after the update, {what} (lr {self.lr:g})",
            {"tensor": found[0] if found else None, "lr": self.lr, "action": "stop"},
        )

    def _stop(self, message: str, row: dict) -> TrainingDiverged:
        """Log why training stops, close the run's trackers, and the error that says what is kept."""
        if self.tracker is not None:
            self.tracker.log(self.step, "nonfinite", row)
            self.tracker.close("FAILED")
            self.tracker = None
        if self.threads is not None:
            self.threads.close()
        last = latest_checkpoint(self.ckpt_root)
        kept = f"last good checkpoint: {last}" if last is not None else "no checkpoint was written"
        return TrainingDiverged(f"{message}; training stopped, {kept}; nothing exported")

    def _flush(self, pending, tracker: Tracker, progress: Progress, tok_s: float) -> None:
        sums = torch.stack([p[1] for p in pending])
        D.all_reduce_sum(self.d, sums)  # each rank summed its own rows
        norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in (p[4] for p in pending)]  # FSDP: DTensor
        norm_vals = torch.stack([n.float() for n in norms]).tolist() if all(n is not None for n in norms) else None
        for i, (step, _, n, lr, _, tokens) in enumerate(pending):
            loss = float(sums[i]) / max(1, n)
            self.losses.append(loss)
            row = {"loss": loss, "lr": lr, "targets": n, "tokens": tokens}
            if norm_vals is not None:
                row["grad_norm"] = norm_vals[i]
            tracker.log(step, "train", row)
        threads = f"{self.threads.threads} thr" if self.threads is not None else ""
        progress.update(pending[-1][0], self.losses[-1], pending[-1][3], tok_s, threads)
