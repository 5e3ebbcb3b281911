"""Evaluation generation speed: yunque's batched KV-cache path vs a per-example transformers loop.

Both generate greedily from the same checkpoint (a randomly initialised preset written in HF
format) for the same prompts of different lengths, stopping at the same stop ids. yunque
runs `yunque.evaluate.runner.generate_texts` (what `yunque eval` uses: length-sorted batches,
left padding, one static KV cache per batch); the baseline calls `model.generate` once per
example, as a hand-written evaluation loop over transformers does. Outputs are compared token
for token, then the speed ratio is printed.

    PYTHONPATH=. python bench/eval.py [--preset base] [--n 32] [--max-new-tokens 48] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch

WORDS = [
    "the",
    "model",
    "reads",
    "a",
    "long",
    "document",
    "about",
    "rivers",
    "mountains",
    "and",
    "cities",
    "then",
    "writes",
    "a",
    "short",
    "summary",
    "of",
    "what",
    "it",
    "learned",
    "while",
    "the",
    "evaluator",
    "compares",
    "every",
    "answer",
    "with",
    "a",
    "reference",
    "text",
]


def build(tmp: Path, preset: str):
    from yunque.formats.hf import save_model
    from yunque.model import Transformer
    from yunque.presets import get_preset
    from yunque.tokenizer import train_bpe

    rng = random.Random(0)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(WORDS, k=40)) for _ in range(400)), encoding="utf-8")
    tok = train_bpe([corpus], vocab_size=512, out_dir=tmp / "model")
    cfg = get_preset(preset, vocab_size=tok.vocab_size)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_id, tok.eos_id
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, tmp / "model", generation_config={"eos_token_id": list(tok.stop_ids), "bos_token_id": tok.bos_id})
    return tmp / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    import transformers

    from yunque.evaluate.loading import load_for_eval
    from yunque.evaluate.runner import generate_texts

    with tempfile.TemporaryDirectory() as d:
        path = build(Path(d), args.preset)
        model, tok = load_for_eval(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        rng = random.Random(1)
        prompts = [
            [tok.bos_id] + tok.encode(" ".join(rng.choices(WORDS, k=rng.randint(8, 120)))) for _ in range(args.n)
        ]
        lens = sorted(len(p) for p in prompts)
        print(
            f"preset {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), {args.n} prompts of "  # noqa: E501
            f"{lens[0]}-{lens[-1]} tokens, up to {args.max_new_tokens} new tokens, threads {torch.get_num_threads()}"
        )

        generate_texts(model, tok, prompts[:2], 4, 2)  # warm-up (allocator, kernels)
        with torch.no_grad():
            hf.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)
        # Interleaved per batch (ours, then the same prompts one by one through transformers), wall
        # and process CPU time: on a shared machine, load that changes during the run hits both sides.
        stops = set(tok.stop_ids)
        ours, theirs, new_ours = [], [], 0
        wall, cpu = {"ours": 0.0, "hf": 0.0}, {"ours": 0.0, "hf": 0.0}
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            t0, c0 = time.perf_counter(), time.process_time()
            texts, timing = generate_texts(model, tok, chunk, args.max_new_tokens, args.batch_size)
            wall["ours"] += time.perf_counter() - t0
            cpu["ours"] += time.process_time() - c0
            ours += texts
            new_ours += timing["new_tokens"]
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                for p in chunk:
                    out = hf.generate(
                        torch.tensor([p]),
                        attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        max_new_tokens=args.max_new_tokens,
                        do_sample=False,
                    )[0, len(p) :].tolist()
                    theirs.append(out)
            wall["hf"] += time.perf_counter() - t0
            cpu["hf"] += time.process_time() - c0
        hf_texts = [tok.decode([t for t in o if t not in stops], skip_special_tokens=True) for o in theirs]
        same = sum(a == b for a, b in zip(ours, hf_texts))
        new_hf = sum(len(o) for o in theirs)
        print(
            f"yunque batched (batch {args.batch_size}): wall {wall['ours']:7.2f} s  cpu {cpu['ours']:7.2f} s  "
            f"{new_ours / wall['ours']:7.1f} new tokens/s"
        )
        print(
            f"transformers per example:     wall {wall['hf']:7.2f} s  cpu {cpu['hf']:7.2f} s  "
            f"{new_hf / wall['hf']:7.1f} new tokens/s"
        )
        print(f"identical greedy outputs: {same}/{len(prompts)}")
        print(
            f"speed-up: {wall['hf'] / wall['ours']:.2f}x wall, {cpu['hf'] / cpu['ours']:.2f}x CPU time (target >= 3x)"
        )


if __name__ == "__main__":
    main()
