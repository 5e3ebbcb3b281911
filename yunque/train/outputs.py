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
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import torch.nn as nn

from yunque.config import to_dict
from yunque.data.manifest import sha256_file as sha256
from yunque.lora import LoraConfig
from yunque.model import Transformer
from yunque.tokenizer import Tokenizer
from yunque.train import distributed as D
from yunque.train.config import TrainConfig
from yunque.train.tracking import plot_metrics
from yunque.untrusted import refuse_symlink, write_replacing

PACKAGES = ("torch", "numpy", "safetensors", "tokenizers", "transformers", "peft", "torchao", "bitsandbytes")


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)  # per step, this session and (on resume) before it
    final: dict = field(default_factory=dict)
    best: dict | None = None
    best_step: int | None = None
    best_checkpoint: Path | None = None
    stopped_early: bool = False
    exported_step: int | None = None  # the step whose weights `output` holds (the best one under early stopping)
    output: Path | None = None  # the HF model directory or the PEFT adapter directory
    run_json: Path | None = None
    privacy: dict | None = None  # DP-SGD: ε, δ, noise, sampling (yunque.train.privacy.DPTraining.report)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
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
    hw = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"packages": versions, "hardware": hw}


def export_model(model: Transformer, tok: Tokenizer, out: Path, d: D.Dist, module: nn.Module) -> Path:
    """Pretrain / full: an HF directory (with the tokenizer); FSDP shards of `module` are gathered first (collective)."""  # noqa: E501
    from yunque.formats.hf import save_model

    if d.kind == "fsdp":
        sd = D.gather_model_state(module, "model.")
        if not d.main:
            return out
        trained = model
        with torch.device("meta"):
            model = Transformer(trained.config)
        model.load_state_dict(sd, assign=True)
        model.inv_freq = trained.inv_freq.detach().cpu() if trained.inv_freq.device.type != "meta" else model.inv_freq
    if d.main:
        refuse_symlink(out)
        # Every stop id (EOS and the template's end of turn), or transformers generates past <|eot_id|>.
        gen = {k: v for k, v in tok.generation_config().items() if v not in (None, [])}
        save_model(model, out, generation_config=gen)
        # The tokenizer goes through a fresh directory and is moved in: a symlink planted at, say,
        # model/tokenizer.json is replaced rather than written through.
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            tok.save(tmp)
            for f in Path(tmp).rglob("*"):
                if f.is_file():
                    (out / f.relative_to(tmp)).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, out / f.relative_to(tmp))
    return out


def export_adapter(
    model: Transformer,
    adapter: LoraConfig,
    base_model_name: str,
    out: Path,
    d: D.Dist,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """The PEFT adapter; under FSDP `tensors` are the gathered adapter weights (the model's are shards)."""
    from yunque.formats.peft import save_peft_adapter

    if d.main:
        refuse_symlink(out)
        save_peft_adapter(model, out, adapter, base_model_name, tensors=tensors)
    return out


def write_outputs(
    cfg: TrainConfig,
    result: TrainResult,
    *,
    model: Transformer,
    module: nn.Module,
    tok: Tokenizer,
    d: D.Dist,
    manifest: dict | None,
    ckpt_root: Path,
    adapter_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Export the trained weights and write run.json (and the plot); fills result.output, best_checkpoint, run_json.

    `module` is what was trained (the DDP / FSDP wrapper of the model and loss); all ranks call this.
    """
    if cfg.trains_adapter:
        result.output = export_adapter(
            model, cfg.adapter, cfg.base_model_name or str(cfg.model.path), cfg.out_dir / "adapter", d, adapter_tensors
        )
    else:
        result.output = export_model(model, tok, cfg.out_dir / "model", d, module)
    if not d.main:
        return
    if result.privacy is not None:  # the guarantee travels with the weights
        from yunque.train.privacy import model_card

        base = (cfg.base_model_name or str(cfg.model.path)) if cfg.model.path else None
        write_replacing(result.output / "README.md", model_card(result.privacy, base))
    result.best_checkpoint = ckpt_root / f"step-{result.best_step:08d}" if result.best_step is not None else None
    if result.best_checkpoint is not None and not result.best_checkpoint.is_dir():
        result.best_checkpoint = None
    if cfg.log.plot and (cfg.out_dir / "metrics.jsonl").is_file():
        plot_metrics(cfg.out_dir / "metrics.jsonl", cfg.out_dir / "loss.png")
    from yunque import __version__

    files = {}
    for p in sorted(cfg.out_dir.rglob("*")):
        rel = p.relative_to(cfg.out_dir)
        if (
            p.is_file()
            and not p.is_symlink()
            and rel.parts[0] not in ("checkpoints", "mlruns", "mlartifacts", "tensorboard")
            and rel.name != "run.json"
            and not rel.name.startswith("mlflow.db")  # the MLflow store changes after run.json is written
        ):
            files[str(rel)] = sha256(p)
    run = {
        "config": to_dict(cfg),
        "seed": cfg.seed,
        "method": cfg.method,
        "yunque_version": __version__,
        "git_commit": git_commit(),
        **environment(),
        "world_size": d.world,
        "data": {
            "dir": str(cfg.data.dir) if cfg.data.dir else None,
            "manifest_sha256": (manifest or {}).get("manifest_sha256"),
            "manifest_roots": manifest,
        },
        "parallel": d.kind,
        "steps": result.steps,
        "tokens": result.tokens,
        "stopped_early": result.stopped_early,
        "exported_step": result.exported_step,
        "final_metrics": result.final,
        **({"privacy": result.privacy} if result.privacy is not None else {}),
        "best_metrics": result.best,
        "best_step": result.best_step,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "output": str(result.output),
        "files_sha256": files,
    }
    path = cfg.out_dir / "run.json"
    write_replacing(path, json.dumps(run, indent=1) + "\n")  # a planted symlink is replaced, not written through
    result.run_json = path
