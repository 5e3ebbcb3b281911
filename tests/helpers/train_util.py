"""Tiny data, tokenizer and configs for the training tests (built in a temp dir, seconds)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in old trees".split()

TINY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def make_corpus(d: Path, n_lines: int = 300, seed: int = 0) -> dict[str, Path]:
    """A learnable text corpus (cyclic word sequences), an SFT set (addition) and a BPE tokenizer."""
    from yunque.tokenizer import train_bpe

    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        s, n = rng.randrange(len(WORDS)), rng.randint(5, 30)
        lines.append(" ".join(WORDS[(s + k) % len(WORDS)] for k in range(n)))
    (d / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(d / "sft.jsonl", "w", encoding="utf-8") as f:
        for _ in range(240):
            a, b = rng.randint(0, 60), rng.randint(0, 60)
            f.write(
                json.dumps(
                    {
                        "kind": "completion",
                        "prompt": f"add {a} and {b} ({' '.join(WORDS[: rng.randint(0, 8)])}) =",
                        "completion": f" {a + b}",
                    }
                )
                + "\n"
            )
    tok = d / "tok"
    if not tok.exists():
        train_bpe([d / "train.txt"], 320, tok)
    return {"text": d / "train.txt", "sft": d / "sft.jsonl", "tok": tok}


def pretrain_cfg(corpus: dict[str, Path], out: Path, **kw) -> dict:
    cfg = {
        "method": "pretrain",
        "out_dir": str(out),
        "tokenizer": str(corpus["tok"]),
        "seed": 7,
        "model": {"preset": "tiny", "overrides": dict(TINY_MODEL)},
        "data": {"train": [str(corpus["text"])], "val_fraction": 0.1, "seq_len": 64},
        "micro_batch": 4,
        "max_steps": 20,
        "optim": {"lr": 3e-3, "warmup_steps": 4},
        "eval": {"every": 10},
        "checkpoint": {"every": 5, "keep_last": 2},
        "log": {"every": 1, "plot": False},
    }
    return deep_update(cfg, kw)


def deep_update(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def run_cli(
    args: list[str], env: dict | None = None, torchrun: int = 0, timeout: float = 240
) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={torchrun}",
            "-m",
            "yunque.recipes.train",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "yunque.recipes.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def one_thread():
    """Fixture body: 1 intra-op thread. The 2-core CI box is shared; 2 OpenMP threads spinning on
    contended cores make a tiny step 50x slower, while 1 thread is steady."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
