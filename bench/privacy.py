"""DP-SGD on the demo's security task: accuracy, canary exposure, membership-inference AUC and speed
without DP and at ε in {1, 3, 8}.

    yunque demo --out runs/demo            # once: the base model and the generated data (or --from-scratch)
    PYTHONPATH=. python bench/privacy.py --demo runs/demo [--eps 1 3 8] [--steps 320] [--batch 32] [--quick]

The base is the demo's: SmolLM2-135M-Instruct as converted into the cache (run.json's `model.dir`)
for `yunque demo`, the pretrained `pretrain/run/model` for `yunque demo --from-scratch`; `--base DIR`
names another. The demo's domain records are prepared again with canaries planted in the training split
(`canaries.count`, 1% of the records by default), then the demo's LoRA fine-tune runs from that
base once without DP and once per ε (δ = 1/n^1.1, max_grad_norm 1, PRV accountant),
with the same steps and learning rate; `--batch` is packed rows per step without DP (several records
each) and the expected records per step under DP (one per row), so the run without DP sees more data.
Each adapter is scored on the test split (task accuracy, as that demo scores it: exact answers for the
from-scratch model, the first label named within 16 tokens for SmolLM2) and audited
(`yunque privacy-audit`: exposure among 1,000 candidates, loss-threshold and base-calibrated
membership inference on train vs test records).
tokens/s is each run's tokens over the wall time of its `train()` call (one evaluation and the export
included), relative to the run without DP; without DP a step's tokens are its packed rows (padding
included, rows are >95% full), under DP the sampled records' tokens.

`--targets demo` adapts what that demo adapts: the attention projections for SmolLM2 (r 16, alpha 32,
as `yunque demo`), the seven projections and lm_head from scratch (r 32, alpha 64), where the adapter on
lm_head leaves DP one backward per record (`privacy.per_sample`); `--targets attn-mlp` adapts the seven
projections without lm_head, which the batched hook gradients cover.

    PYTHONPATH=. python bench/privacy.py --engines [--preset small] [--length 128] [--batch 16]

times the per-record gradients alone: one DP step's clipped sum over `--batch` random records of
`--length` tokens on a random LoRA model, by hooks and by the loop, against a plain (non-private)
backward over the same rows, interleaved, medians of `--rounds`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def prepare_with_canaries(demo: Path, out: Path, canaries: int, seed: int) -> Path:
    from yunque.config import from_dict
    from yunque.data.config import DataConfig
    from yunque.data.pipeline import prepare

    data = out / "data"
    if (data / "manifest.json").is_file():
        return data
    cfg = from_dict(
        DataConfig,
        {"pii": {"modes": {"IPV4": "off", "IPV6": "off"}}, "split": {"seed": seed}, "canaries": {"count": canaries}},
    )
    prepare([demo / "domain" / "raw.jsonl"], data, cfg, log=lambda *a, **k: None)
    return data


def demo_base(demo: Path) -> tuple[Path, str] | None:
    """(base model, demo kind) of a finished demo folder: `yunque demo --from-scratch`'s pretrained model,
    else the converted model `yunque demo` fine-tuned (run.json's model.dir); None when neither is there."""
    scratch = demo / "pretrain" / "run" / "model"
    if (scratch / "config.json").is_file():
        return scratch, "from-scratch"
    try:
        d = Path(json.loads((demo / "run.json").read_text(encoding="utf-8"))["model"]["dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (d, "pretrained") if (d / "config.json").is_file() else None


def finetune(base: Path, data: Path, out: Path, args, eps: float | None) -> dict:
    from yunque.config import from_dict
    from yunque.demo import pretrained
    from yunque.demo.run import LORA_TARGETS
    from yunque.recipes.train import train
    from yunque.train.config import TrainConfig

    lora = {"r": 32, "alpha": 64.0, "dropout": 0.0}
    targets = [t for t in LORA_TARGETS if t != "lm_head"]
    if args.targets == "demo" and args.kind == "pretrained":
        lora, targets = {**pretrained.LORA, "dropout": 0.0}, pretrained.LORA_TARGETS
    elif args.targets == "demo":
        targets = LORA_TARGETS
    cfg = {
        "method": "lora",
        "out_dir": str(out),
        "overwrite": True,
        "seed": args.seed,
        "model": {"path": str(base)},
        "data": {"dir": str(data), "seq_len": 512},
        "lora": {**lora, "target_modules": targets},
        "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 10), "weight_decay": 0.0},
        "eval": {"every": 0, "max_batches": 8},  # once, at the end: the wall time is the training's
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 10, "plot": False},
        "micro_batch": min(args.batch, 8),
        "grad_accum": max(1, args.batch // 8),
        "max_steps": args.steps,
        "device": "cpu",
    }
    if eps is not None:
        cfg["privacy"] = {"target_epsilon": eps, "max_grad_norm": 1.0, "accountant": "prv", "seed": args.seed}
    t = time.perf_counter()
    r = train(from_dict(TrainConfig, cfg))
    seconds = time.perf_counter() - t
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = max(x["tokens"] for x in rows if x["kind"] == "train")
    return {"adapter": str(r.output), "seconds": seconds, "tokens": tokens, "privacy": r.privacy}


def accuracy(base: Path, adapter: Path, data: Path, out: Path, limit: int | None, kind: str) -> float:
    from yunque.demo.scoring import evaluate_model, evaluate_pair
    from yunque.formats.peft import merge_adapter

    merged = out / "merged"
    merge_adapter(base, adapter, merged)
    if kind == "pretrained":  # as `yunque demo` scores it; the base's answers are in that demo's report
        from yunque.demo.pretrained import FULL, first_per_task
        from yunque.demo.run import read_jsonl

        test = first_per_task(read_jsonl(data / "test.jsonl"), None)[:limit]
        res = evaluate_model(
            "fine-tuned", merged, test, out / "eval", rule="first_label", max_new_tokens=FULL.max_new_tokens
        )
        return res["tasks"]["all"]["accuracy"]
    res = evaluate_pair(base, merged, data / "test.jsonl", out / "eval", limit=limit)
    return res["fine-tuned"]["tasks"]["all"]["accuracy"]


def engines(args) -> int:
    import statistics

    import numpy as np
    import torch

    from yunque.lora import LoraConfig, apply_lora
    from yunque.model import Transformer
    from yunque.presets import get_preset
    from yunque.train.loss import CausalLMLoss
    from yunque.train.packing import ArraySource
    from yunque.train.privacy import HookGrads, LoopGrads, record_rows
    from yunque.train.step import to_device

    torch.manual_seed(0)
    model = Transformer(get_preset(args.preset))
    model.init_weights()
    apply_lora(model, LoraConfig(r=16, alpha=32))
    module = CausalLMLoss(model)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    src = ArraySource.from_docs([(rng.integers(3, V, args.length).tolist(), None) for _ in range(args.batch)])
    b, lengths = record_rows(src, np.arange(args.batch), args.length, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    cpu = torch.device("cpu")

    def plain():
        db = to_device(b, cpu)
        module(db.input_ids, db.positions, db.mask, db.target_idx, db.targets).backward()
        model.zero_grad(set_to_none=True)

    def run(engine):
        acc = [torch.zeros_like(p) for p in params]
        engine.add_clipped(module, b, lengths, cpu, "fp32", acc, 1.0)

    ways = {
        "plain backward (no DP)": plain,
        "hooks": lambda: run(HookGrads(model)),
        "loop": lambda: run(LoopGrads(params)),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for f in ways.values():
        f()  # warm-up
    for _ in range(args.rounds):
        for k, f in ways.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    tokens = args.batch * args.length
    print(f"preset {args.preset}, {args.batch} records x {args.length} tokens, {torch.get_num_threads()} threads")
    print("| per-record gradients | s per batch | tokens/s | vs plain |")
    print("|---|---|---|---|")
    base = statistics.median(times["plain backward (no DP)"])
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"| {k} | {m:.3f} | {tokens / m:,.0f} | {base / m:.2f}x |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--demo", type=Path, default=Path("runs/demo"), help="a finished `yunque demo` (or --from-scratch) run folder"
    )
    ap.add_argument("--base", type=Path, default=None, help="the base model to fine-tune (default: the demo's)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-privacy"))
    ap.add_argument("--eps", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    ap.add_argument("--steps", type=int, default=None, help="default 320 (--quick: 40)")
    ap.add_argument("--batch", type=int, default=32, help="expected batch size (Poisson under DP)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--canaries", type=int, default=8)
    ap.add_argument("--targets", choices=["demo", "attn-mlp"], default="demo")
    ap.add_argument("--test-limit", type=int, default=None, help="score only the first N test records (--quick: 96)")
    ap.add_argument("--audit-records", type=int, default=None, help="default 500 (--quick: 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick", action="store_true", help="40 steps, 96 test records, 200 audit records unless given (a smoke run)"
    )
    ap.add_argument("--engines", action="store_true", help="time hooks vs loop per-record gradients only")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.engines:
        return engines(args)
    quick = {"steps": 40, "test_limit": 96, "audit_records": 200} if args.quick else {}
    for k, v in {"steps": 320, "test_limit": None, "audit_records": 500, **quick}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    from yunque.evaluate.privacy_audit import run_audit

    found = demo_base(args.demo)
    if (found is None and args.base is None) or not (args.demo / "domain" / "raw.jsonl").is_file():
        print(f"{args.demo}: not a finished `yunque demo` run folder (run `yunque demo --out {args.demo}`)")
        return 2
    if args.base is not None and not (args.base / "config.json").is_file():
        print(f"--base {args.base}: not a model directory (no config.json)")
        return 2
    base, args.kind = found or (args.base, "pretrained")  # no from-scratch model there: the default demo's data
    base = args.base or base
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_with_canaries(args.demo, args.out, args.canaries, args.seed)
    results = []
    for eps in [None, *args.eps]:
        name = "no DP" if eps is None else f"ε={eps:g}"
        run = args.out / ("nodp" if eps is None else f"eps{eps:g}")
        print(f"--- {name}: fine-tuning", file=sys.stderr, flush=True)
        ft = finetune(base, data, run / "train", args, eps)
        acc = accuracy(base, Path(ft["adapter"]), data, run, args.test_limit, args.kind)
        audit = run_audit(base, data, adapter=Path(ft["adapter"]), max_records=args.audit_records, seed=args.seed)
        row = {
            "setting": name,
            "epsilon": ft["privacy"]["epsilon"] if ft["privacy"] else None,
            "noise_multiplier": ft["privacy"]["noise_multiplier"] if ft["privacy"] else None,
            "accuracy": acc,
            "exposure": audit["exposure"]["mean"] if "exposure" in audit else None,
            "exposure_base": audit["exposure"]["reference_mean"] if "exposure" in audit else None,
            "mia_auc": audit["loss_attack"]["auc"],
            "mia_auc_ci95": audit["loss_attack"]["auc_ci95"],
            "mia_auc_calibrated": audit["calibrated_attack"]["auc"],
            "tokens_per_s": ft["tokens"] / ft["seconds"],
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    ref = results[0]["tokens_per_s"]
    print(
        f"\nbase {base} ({args.kind} demo), steps {args.steps}, expected batch {args.batch}, targets {args.targets}, "
        f"seed {args.seed}\n"
    )
    print("| setting | σ | accuracy | exposure (bits; base) | MIA AUC [95%] | calibrated AUC | tokens/s vs no DP |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        sigma = f"{r['noise_multiplier']:.3g}" if r["noise_multiplier"] is not None else "-"
        exp = f"{r['exposure']:.2f} ({r['exposure_base']:.2f})" if r["exposure"] is not None else "-"
        lo, hi = r["mia_auc_ci95"]
        print(
            f"| {r['setting']} | {sigma} | {r['accuracy']:.1f}% | {exp} | {r['mia_auc']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {r['mia_auc_calibrated']:.3f} | {r['tokens_per_s'] / ref:.2f}x |"
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
