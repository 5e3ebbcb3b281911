"""What a training run leaves behind: the model (HF dir) or adapter (PEFT dir), run.json, the plot.

run.json records how to reproduce and check the run: resolved config, seed, yunque version
and git commit, package versions, hardware, the data manifest's roots, final and best
metrics, and the SHA-256 of every output file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from yunque.train import distributed as D
from yunque.config import to_dict
from yunque.data.manifest import sha256_file as sha256
from yunque.train.tracking import plot_metrics
from yunque.untrusted import refuse_symlink, write_replacing

if TYPE_CHECKING:
    from yunque.train.loop import Trainer, TrainResult

PACKAGES = ("torch", "numpy", "safetensors", "tokenizers", "transformers", "peft", "torchao", "bitsandbytes")




def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    hw = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"packages": versions, "hardware": hw}


def export_model(tr: Trainer, out: Path) -> Path:
    """Pretrain / full: an HF directory (with the tokenizer); FSDP shards are gathered first (collective)."""
    from yunque.formats.hf import save_model
    from yunque.model import Transformer

    model = tr.model
    if tr.d.kind == "fsdp":
        sd = D.gather_model_state(tr.module, "model.")
        if not tr.d.main:
            return out
        with torch.device("meta"):
            model = Transformer(tr.model.config)
        model.load_state_dict(sd, assign=True)
        model.inv_freq = tr.model.inv_freq.detach().cpu() if tr.model.inv_freq.device.type != "meta" else model.inv_freq
    if tr.d.main:
        refuse_symlink(out)
        save_model(model, out)
        # The tokenizer goes through a fresh directory and is moved in: a symlink planted at, say,
        # model/tokenizer.json is replaced rather than written through.
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            tr.tok.save(tmp)
            for f in Path(tmp).rglob("*"):
                if f.is_file():
                    (out / f.relative_to(tmp)).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, out / f.relative_to(tmp))
    return out


def export_adapter(tr: Trainer, out: Path) -> Path:
    from yunque.formats.peft import save_peft_adapter
    from yunque.train.loop import _lora_config

    # FSDP: the adapter is sharded DTensors; gather them (a collective, every rank) and save those.
    tensors = tr._model_tensors() if tr.d.kind == "fsdp" else None
    if tr.d.main:
        refuse_symlink(out)
        base = tr.cfg.base_model_name or str(tr.cfg.model.path)
        save_peft_adapter(tr.model, out, _lora_config(tr.cfg), base, tensors=tensors)
    return out


def write_outputs(tr: Trainer, result: TrainResult) -> None:
    cfg = tr.cfg
    if cfg.method in ("pretrain", "full"):
        result.output = export_model(tr, cfg.out_dir / "model")
    else:
        result.output = export_adapter(tr, cfg.out_dir / "adapter")
    if not tr.d.main:
        return
    ckpts = tr.ckpt_root
    result.best_checkpoint = ckpts / f"step-{result.best_step:08d}" if result.best_step is not None else None
    if result.best_checkpoint is not None and not result.best_checkpoint.is_dir():
        result.best_checkpoint = None
    if cfg.log.plot and (cfg.out_dir / "metrics.jsonl").is_file():
        plot_metrics(cfg.out_dir / "metrics.jsonl", cfg.out_dir / "loss.png")
    from yunque import __version__

    files = {}
    for p in sorted(cfg.out_dir.rglob("*")):
        rel = p.relative_to(cfg.out_dir)
        if p.is_file() and not p.is_symlink() and rel.parts[0] not in ("checkpoints", "mlruns", "tensorboard") and rel.name != "run.json":
            files[str(rel)] = sha256(p)
    run = {"config": to_dict(cfg), "seed": cfg.seed, "method": cfg.method, "yunque_version": __version__,
           "git_commit": git_commit(), **environment(), "world_size": tr.d.world,
           "data": {"dir": str(cfg.data.dir) if cfg.data.dir else None,
                    "manifest_sha256": (tr.data.manifest or {}).get("manifest_sha256"), "manifest_roots": tr.data.manifest},
           "parallel": tr.d.kind, "steps": result.steps, "tokens": result.tokens, "stopped_early": result.stopped_early,
           "exported_step": result.exported_step,
           "final_metrics": result.final, "best_metrics": result.best, "best_step": result.best_step,
           "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
           "output": str(result.output), "files_sha256": files}
    path = cfg.out_dir / "run.json"
    write_replacing(path, json.dumps(run, indent=1) + "\n")  # a planted symlink is replaced, not written through
    result.run_json = path
