"""Inference quantisation quality: perplexity on held-out real text, fp32 / bf16 / int8 / int4.

    PYTHONPATH=. python bench/quantize.py                        # trains a small model on tinyshakespeare first
    PYTHONPATH=. python bench/quantize.py --model DIR --text FILE    # a model directory as it is, on its own text

The text is ../shared/data/tinyshakespeare.txt (or $YUNQUE_SHARED_DATA) unless --text names
another; its last 10% is held out (the model trained here sees only the first 90%). Each
quantised variant is written by `yunque quantize` and loaded as every inference command loads it
(`yunque.inference.load`); perplexity is `yunque eval`'s (sliding windows of 256 tokens).
Targets (issue 21): int8 within 1% of fp32 perplexity, int4 group 32 within 5%. Speed is
bench/quantize_matmul.py's (the kernels) and bench/generate.py's (decode).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("YUNQUE_SHARED_DATA", ROOT.parent.parent / "shared" / "data"))
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")

# name -> (dtype, quantize arguments or None). "kernels": every linear through the packed CPU kernels on
# bf16-rounded activations, as decode runs them (scoring batches are past KERNEL_MAX_ROWS otherwise).
VARIANTS = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", ["--bits", "8"]),
    "int8 kernels": ("float32", ["--bits", "8"]),
    "int8 + head + embedding": ("float32", ["--bits", "8", "--include-head", "--include-embedding"]),
    "int4 g32": ("float32", ["--bits", "4", "--group-size", "32"]),
    "int4 g32 kernels": ("float32", ["--bits", "4", "--group-size", "32"]),
    "int4 g32 asym": ("float32", ["--bits", "4", "--group-size", "32", "--asymmetric"]),
    "int4 g64": ("float32", ["--bits", "4", "--group-size", "64"]),
    "int4 g32 + head + embedding": (
        "float32",
        ["--bits", "4", "--group-size", "32", "--include-head", "--include-embedding"],
    ),
}


def train_small(text_path: Path, work: Path, steps: int) -> Path:
    from yunque.config import from_dict
    from yunque.recipes.train import train
    from yunque.tokenizer import train_bpe
    from yunque.train.config import TrainConfig

    text = text_path.read_text(encoding="utf-8")
    (work / "train.txt").write_text(text[: int(len(text) * 0.9)], encoding="utf-8")
    train_bpe([work / "train.txt"], 1024, work / "tok")
    cfg = {
        "method": "pretrain",
        "tokenizer": str(work / "tok"),
        "seed": 1337,
        "out_dir": str(work / "run"),
        "model": {
            "preset": "tiny",
            "overrides": {
                "hidden_size": 192,
                "intermediate_size": 512,
                "num_hidden_layers": 4,
                "num_attention_heads": 6,
                "num_key_value_heads": 2,
                "tie_word_embeddings": False,
            },
        },
        "data": {"train": [str(work / "train.txt")], "val_fraction": 0.05, "seq_len": 128},
        "micro_batch": 16,
        "max_steps": steps,
        "optim": {"lr": 3e-3, "warmup_steps": 30, "min_lr_ratio": 0.1},
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
        "log": {"every": 100, "plot": False},
    }
    t = time.perf_counter()
    r = train(from_dict(TrainConfig, cfg))
    print(f"trained {steps} steps in {time.perf_counter() - t:.0f} s (final train loss {r.losses[-1]:.3f})")
    return r.out_dir / "model"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a model directory (default: train a small one on the text first)")
    ap.add_argument("--steps", type=int, default=600, help="training steps of the small model")
    ap.add_argument("--text", help="the text (default: tinyshakespeare); its last 10%% is scored")
    ap.add_argument("--chars", type=int, default=30000, help="held-out characters scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = Path(args.text) if args.text else SHARED / "tinyshakespeare.txt"
    if not src.is_file():
        print(f"skip: {src} not found")
        return
    from yunque import quantize
    from yunque.evaluate.perplexity import perplexity
    from yunque.inference import load
    from yunque.recipes.quantize import quantize_cmd

    text = src.read_text(encoding="utf-8")
    held = text[int(len(text) * 0.9) :][: args.chars]
    docs = [d for d in held.split("\n\n") if d.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = Path(args.model) if args.model else train_small(src, work, args.steps)
        rows, base, written = [], None, {}
        for name in args.variants.split(","):
            dtype, qargs = VARIANTS[name]
            d = model_dir
            if qargs and tuple(qargs) in written:
                d = written[tuple(qargs)]
            elif qargs:
                d = written[tuple(qargs)] = work / "".join(c if c.isalnum() else "_" for c in name)
                kw = {
                    "bits": int(qargs[1]),
                    "group_size": int(qargs[3]) if "--group-size" in qargs else None,
                    "asymmetric": "--asymmetric" in qargs,
                    "include_head": "--include-head" in qargs,
                    "include_embedding": "--include-embedding" in qargs,
                }
                quantize_cmd(str(model_dir), out=str(d), **kw)
            m, tok = load(d, dtype=dtype, device="cpu")
            size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            rows_before = quantize.KERNEL_MAX_ROWS
            if name.endswith("kernels"):
                quantize.KERNEL_MAX_ROWS = 1 << 30
            try:
                with torch.inference_mode():
                    r = perplexity(m, tok, docs, max_length=256)
            finally:
                quantize.KERNEL_MAX_ROWS = rows_before
            base = base or r.perplexity
            rows.append((name, r.perplexity, 100 * (r.perplexity / base - 1), size / 1e6))
            del m
    cfg_note = f"model {args.model}" if args.model else f"small model trained {args.steps} steps on the first 90%"
    print(
        f"\n{cfg_note}; perplexity of {len(docs)} held-out passages of {src.name} ({len(held)} chars), "
        f"torch {torch.__version__}"
    )
    print("| variant | perplexity | vs fp32 | weights file MB |\n|---|---|---|---|")
    for name, ppl, rel, mb in rows:
        print(f"| {name} | {ppl:.3f} | {rel:+.2f}% | {mb:.2f} |")


if __name__ == "__main__":
    main()
