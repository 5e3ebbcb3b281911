"""Decode speed: yunque vs llama.cpp on the same weights, interleaved in one run (issue 21).

yunque decodes from a model directory (fp32, bf16, or `yunque quantize` int8 / int4 group 32);
llama.cpp (llama-cpp-python, the `llamacpp` extra) decodes the GGUF that `yunque export` wrote
from the same directory. Both: one random prompt of --prompt tokens, --new greedy tokens, batch
1, 2 threads, prefill included in the time (and "decode alone": the time past prefill and the
first token), runs alternating yunque / llama.cpp, medians compared.
The weights' read rate is the bytes one decode step streams (everything but the embedding rows,
a tied head included) x steps/s, against the read bandwidth `bench/generate.py` measures.

    python bench/llamacpp.py                       # SmolLM2-135M-Instruct and the ~1B model
    python bench/llamacpp.py --models smollm2 --reps 3
    python bench/llamacpp.py --pairs int8:q8_0 int4:q4_0

Models: `smollm2` is the real SmolLM2-135M-Instruct (`yunque models`); `1b` has Llama-3.2-1B's
shape (hidden 2048, 16 layers, 32 / 8 heads, MLP 8192, tied) with random weights and SmolLM2's
tokenizer and vocabulary (49,152 rather than 128,256: 0.97B parameters). Batch 8 is yunque's own
(`--batch8`): its tokens/s over its batch 1, which the issue wants >= 4x. "linears alone" is the
tokens/s of yunque's linear layers with nothing around them (`--bound-only` prints just that):
the ceiling of any decode loop built on those GEMV kernels. Results go to
bench/NOTES.md ("Decode against llama.cpp").
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import read_bandwidth, timed  # noqa: E402

from yunque.formats.gguf_export import export_gguf  # noqa: E402
from yunque.formats.hf import save_model  # noqa: E402
from yunque.formats.peft import TOKENIZER_FILES  # noqa: E402
from yunque.generate import Sampling, generate  # noqa: E402
from yunque.inference import load  # noqa: E402
from yunque.model import ModelConfig, Transformer  # noqa: E402
from yunque.models import resolve_model  # noqa: E402
from yunque.recipes.quantize import quantize_cmd  # noqa: E402

SMOL = "smollm2-135m-instruct"
# yunque precision : llama.cpp type. f32 is the same bytes as fp32; the issue pairs fp32 with f16 too.
PAIRS = ["fp32:f32", "fp32:f16", "bf16:bf16", "int8:q8_0", "int4:q4_0"]


def one_b(smol: Path, out: Path) -> Path:
    """Llama-3.2-1B's shape, random weights, SmolLM2's tokenizer."""
    cfg = ModelConfig(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights()
    save_model(m, out)
    for f in TOKENIZER_FILES:
        if (smol / f).exists():
            shutil.copy(smol / f, out / f)
    return out


def yunque_dir(src: Path, prec: str, work: Path) -> tuple[Path, str]:
    """The directory and load dtype yunque decodes for `prec`."""
    if prec in ("fp32", "bf16"):
        return src, {"fp32": "float32", "bf16": "bfloat16"}[prec]
    out = work / f"yunque-{prec}"
    if not (out / "config.json").exists():
        bits = 8 if prec == "int8" else 4
        # A tied head is quantised with the embedding, as llama.cpp's q8_0 / q4_0 files quantise token_embd.
        quantize_cmd(str(src), bits=bits, out=out, include_head=True, include_embedding=True)
    return out, "float32"


def streamed_bytes(cfg, prec: str, model) -> float:
    """What one decode step reads: every weight but the embedding table (one row of it); a tied head
    reads the table. Counted from the config: decode packing rearranges the parameters. Quantised
    weights at their storage bits (codes and scales)."""
    from yunque.quantize import storage_bits

    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_size
    q = cfg.num_attention_heads * cfg.head_size
    per_layer = h * (2 * q + 2 * kv) + 3 * h * cfg.intermediate_size + 2 * h
    n = cfg.num_hidden_layers * per_layer + h + cfg.vocab_size * h
    bits = {"fp32": 32, "bf16": 16}.get(prec) or storage_bits(model)
    return n * bits / 8


def linears_alone(model, passes: int = 10) -> float:
    """Tokens/s of the model's linears alone at batch 1 (every layer's, then the head; nothing else):
    the most any decode loop around these GEMV kernels can reach. Weights come from memory as in
    decode, since the model is far larger than the caches."""
    lins = [m for m in model.modules() if hasattr(m, "in_features") and not list(m.children())]
    dtype = model.model.norm.weight.dtype  # the activations'
    xs = {n: torch.randn(1, n).to(dtype) for n in {m.in_features for m in lins}}
    with torch.inference_mode():
        for m in lins:
            m(xs[m.in_features])
        t = time.perf_counter()
        for _ in range(passes):
            for m in lins:
                m(xs[m.in_features])
    return passes / (time.perf_counter() - t)


def open_llama(llama_cpp, path: Path, n_ctx: int):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=2, n_threads_batch=2, verbose=False
    )


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()  # else llama-cpp-python reuses the cached prompt and skips the prefill yunque does
    out = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(tok)
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["smollm2", "1b"])
    ap.add_argument("--pairs", nargs="*", default=PAIRS, help="yunque:llama.cpp precisions")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bound-only", action="store_true", help="only yunque's linears-alone tok/s per precision")
    ap.add_argument("--batch8", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--work", type=Path, default=None, help="keep exports here between runs (default: a temp dir)")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: `bash install.sh llamacpp` (builds llama.cpp, ~5 minutes)")
    torch.set_num_threads(2)
    rbw = read_bandwidth()
    print(
        f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, 2 threads, "
        f"read bandwidth {rbw / 1e9:.1f} GB/s"
    )
    print(f"prompt {args.prompt}, new {args.new}, batch 1, reps {args.reps} (interleaved, medians)\n", flush=True)
    work_root = args.work or Path(tempfile.mkdtemp(prefix="yunque-llamacpp-"))
    smol = resolve_model(SMOL)
    rows = []
    for name in args.models:
        work = work_root / name
        work.mkdir(parents=True, exist_ok=True)
        src = (
            smol
            if name == "smollm2"
            else (work / "model" if (work / "model" / "config.json").exists() else one_b(smol, work / "model"))
        )
        g = torch.Generator().manual_seed(0)
        for pair in args.pairs:
            ours_p, theirs_p = pair.split(":")
            d, dtype = yunque_dir(src, ours_p, work)
            gguf_path = work / f"model.{theirs_p}.gguf"
            if not gguf_path.exists() and not args.bound_only:
                export_gguf(src, gguf_path, theirs_p)
            model, _ = load(d, dtype=dtype, device="cpu")
            torch.set_num_threads(2)
            bound = linears_alone(model)
            if args.bound_only:
                print(f"{name} {ours_p}: the linears alone run at {bound:.1f} tokens/s", flush=True)
                continue
            prompt = torch.randint(3, model.config.vocab_size, (args.prompt,), generator=g).tolist()
            llm = open_llama(llama_cpp, gguf_path, args.prompt + args.new + 8)

            def ours(n=args.new, b=1):
                return generate(model, [prompt] * b, Sampling(max_new_tokens=n))[0]  # noqa: B023

            def theirs(n=args.new):
                return llama_greedy(llm, prompt, n)  # noqa: B023

            same = sum(1 for _ in _prefix(ours(32), theirs(32)))  # warm-up, and how far they agree
            t_o, t_t, p_o, p_t = [], [], [], []
            for _ in range(args.reps):
                t_o.append(timed(ours))
                t_t.append(timed(theirs))
                p_o.append(timed(lambda: ours(1)))  # noqa: B023
                p_t.append(timed(lambda: theirs(1)))  # noqa: B023
            a, b = statistics.median(t_o), statistics.median(t_t)
            tps_o, tps_t = args.new / a, args.new / b
            # decode alone: the time past prefill + first token, per further token
            dec_o = (args.new - 1) / (a - statistics.median(p_o))
            dec_t = (args.new - 1) / (b - statistics.median(p_t))
            frac = streamed_bytes(model.config, ours_p, model) * dec_o / rbw
            b8 = ""
            if args.batch8:
                t8 = statistics.median(timed(lambda: ours(b=8)) for _ in range(max(1, args.reps - 1)))  # noqa: B023
                b8 = f"{8 * args.new / t8 / tps_o:.2f}x"
            rows.append(
                (
                    name,
                    ours_p,
                    theirs_p,
                    tps_o,
                    tps_t,
                    tps_o / tps_t,
                    dec_o,
                    dec_t,
                    dec_o / dec_t,
                    bound,
                    frac,
                    b8,
                    same,
                )
            )
            print(
                f"{name} {ours_p} vs {theirs_p}: yunque {tps_o:.1f} tok/s, llama.cpp {tps_t:.1f} tok/s, "
                f"ratio {tps_o / tps_t:.2f}x; decode alone {dec_o:.1f} vs {dec_t:.1f} tok/s, {dec_o / dec_t:.2f}x; "
                f"yunque's linears alone {bound:.1f} tok/s; "
                f"yunque weights at {frac:.0%} of read bw, batch 8 {b8 or '-'}, "
                f"greedy agree {same}/32 (spread yunque {max(t_o) / min(t_o) - 1:.1%}, "
                f"llama.cpp {max(t_t) / min(t_t) - 1:.1%})",
                flush=True,
            )
            model = llm = None  # free both before the next pair loads
    print(
        "\n| model | yunque | llama.cpp | yunque tok/s | llama.cpp tok/s | ratio | decode alone: yunque | llama.cpp "
        "| ratio | yunque linears alone | yunque weights / read bw | yunque batch 8 / batch 1 "
        "| first 32 greedy tokens equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f}x | {r[6]:.1f} | {r[7]:.1f} "
            f"| {r[8]:.2f}x | {r[9]:.1f} | {r[10]:.0%} | {r[11]} | {r[12]} |"
        )
    if args.work is None:
        shutil.rmtree(work_root, ignore_errors=True)


def _prefix(a: list[int], b: list[int]):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n{time.perf_counter() - t0:.0f} s")
