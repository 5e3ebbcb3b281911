"""`run_demo`: corpus -> tokenizer -> pretraining -> data prepare -> LoRA -> merge -> evaluation -> report.

Every stage is the project's own public API (what the individual `yunque` commands call), run
with settings sized for 2 CPU cores, and every stage writes under one run folder:

    corpus/      the stdlib corpus (corpus.txt, corpus.sources.tsv, corpus.json)
    domain/      the generated instruction set before preparation (raw.jsonl)
    data/        `yunque data prepare` output: train/val/test.jsonl, report.md, manifest.json
    pretrain/    pretraining text (pretrain.jsonl), tokenizer/, the trainer's run folder (model/, loss.png)
    finetune/    the LoRA run folder (adapter/, loss.png, run.json)
    model/       the merged fine-tuned model (Hugging Face format, tokenizer included)
    eval/        predictions of the base and fine-tuned models on the test split
    report.md, run.json, *.png

Determinism: all randomness is seeded and training runs a fixed number of steps (never a
time limit), so one seed gives the same numbers on one machine and software stack.

The pretraining text never contains a task answer: it is the corpus plus the *prompts* of the
training split (logs, e-mails, alerts), so the base model knows what the domain text looks
like but was never taught the tasks; only LoRA fine-tuning sees the answers.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from yunque.demo import corpus as corpus_mod
from yunque.demo import domain
from yunque.demo.report import write_report
from yunque.demo.result import DemoResult


@dataclass(frozen=True)
class DemoPlan:
    records: int  # generated domain records (before dedup)
    vocab_size: int
    model: dict  # ModelConfig overrides over the "tiny" preset
    pretrain_bytes: int  # stdlib text in the pretraining mix (the rest of the corpus is not needed)
    pretrain_steps: int
    pretrain_batch: int
    pretrain_seq: int
    pretrain_lr: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    lora_r: int
    test_limit: int | None  # evaluate on the first n test records (None: all)
    accuracy_bar: float  # the fine-tuned task accuracy (%) this plan is expected to reach


# LoRA also adapts the untied lm_head: after minutes of pretraining the output embeddings are too
# small for adapters on the projections alone to make an answer confident. Fine-tuning gets more
# of the steps than pretraining, at the steadiest LoRA lr tried (bench/NOTES.md).
# Steps are fixed, never a time limit (determinism).
_MODEL = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
FULL = DemoPlan(
    records=domain.DEFAULT_RECORDS,
    vocab_size=4096,
    model=_MODEL,
    pretrain_bytes=600_000,
    pretrain_steps=160,
    pretrain_batch=16,
    pretrain_seq=256,
    pretrain_lr=2e-3,
    finetune_steps=320,
    finetune_batch=8,
    finetune_lr=2e-3,
    lora_r=32,
    test_limit=None,
    accuracy_bar=80.0,
)
# The same path, short, with a 1.3M-parameter model: its accuracy is sensitive to the seed and
# to rounding, so the full run is the one to judge the model by (bench/NOTES.md).
QUICK = DemoPlan(
    records=domain.QUICK_RECORDS,
    vocab_size=2048,
    model=dict(max_position_embeddings=1024, tie_word_embeddings=False),
    pretrain_bytes=400_000,
    pretrain_steps=40,
    pretrain_batch=8,
    pretrain_seq=256,
    pretrain_lr=1.5e-3,
    finetune_steps=160,
    finetune_batch=8,
    finetune_lr=3e-3,
    lora_r=32,
    test_limit=48,
    accuracy_bar=40.0,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


class Clock:
    def __init__(self, stages: dict[str, float], total: int, log) -> None:
        self.stages, self.total, self.log = stages, total, log
        self.cpu: dict[str, float] = {}  # stage -> CPU seconds of this process (all threads)
        self.t0 = time.perf_counter()

    def stage(self, name: str, what: str):
        clock = self

        class _S:
            def __enter__(self_inner):
                clock.log(f"[{len(clock.stages) + 1}/{clock.total}] {what} ...")
                self_inner.t, self_inner.cpu = time.perf_counter(), time.process_time()

            def __exit__(self_inner, *exc):
                dt = time.perf_counter() - self_inner.t
                clock.stages[name] = round(dt, 2)
                clock.cpu[name] = round(time.process_time() - self_inner.cpu, 2)
                if exc[0] is None:
                    clock.log(f"      done in {dt:.1f} s (total {time.perf_counter() - clock.t0:.0f} s)")

        return _S()


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pretraining_text(corpus_dir: Path, train_records: list[dict], max_corpus_bytes: int, seed: int) -> list[dict]:
    """Text records: a seeded sample of the corpus (up to `max_corpus_bytes`) and the user turns of
    the training split, shuffled together. Test and validation records are never included."""
    rng = random.Random(seed)
    docs = [text for _kind, _src, text in corpus_mod.read_corpus(corpus_dir)]
    rng.shuffle(docs)
    picked, size = [], 0
    for text in docs:
        if size >= max_corpus_bytes:
            break
        picked.append(text)
        size += len(text.encode("utf-8"))
    prompts = [m["content"] for r in train_records for m in r["messages"] if m["role"] == "user"]
    rows = [{"kind": "text", "text": t} for t in picked + prompts]
    rng.shuffle(rows)
    return rows


def count_params(cfg) -> int:
    import torch

    from yunque.model import Transformer

    with torch.device("meta"):  # shapes only, no memory
        return sum(p.numel() for p in Transformer(cfg).parameters())


def train_config(**kw):
    from yunque.config import from_dict
    from yunque.train.config import TrainConfig

    # A demo run folder is rebuilt from scratch each time, an earlier demo's checkpoints included.
    return from_dict(TrainConfig, {"overwrite": True, **kw})


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, log=print) -> DemoResult:
    import torch

    from yunque.config import from_dict
    from yunque.data.config import DataConfig
    from yunque.data.pipeline import prepare
    from yunque.presets import get_preset
    from yunque.recipes.train import train
    from yunque.tokenizer import train_bpe

    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out, 0.0)
    facts = result.facts
    facts.update(plan=asdict(plan), quick=quick, seed=seed, torch_threads=torch.get_num_threads())
    clock = Clock(result.stages, 8, log)

    with clock.stage("corpus", "corpus: docstrings, comments, reference text and code of Python's stdlib"):
        info = corpus_mod.build_corpus(out / "corpus", log=lambda line: log(f"      {line}"))
        facts["corpus"] = asdict(info)
        log(f"      {info.documents:,} documents, {info.bytes / 1e6:.1f} MB, sha256 {info.sha256[:16]}…")

    with clock.stage("domain", "domain data: auth-log triage, phishing, alert tactics (seeded, with planted PII)"):
        dinfo = domain.write_domain(out / "domain" / "raw.jsonl", plan.records, seed)
        facts["domain"] = asdict(dinfo)
        log(
            f"      {dinfo.records} records, {dinfo.with_pii} with PII/secrets, "
            f"{dinfo.exact_duplicates} exact + {dinfo.near_duplicates} near duplicates planted"
        )

    with clock.stage("prepare", "yunque data prepare: clean, scrub PII, dedup, split, manifest"):
        # IP addresses are the indicators the tasks are about, not personal data here.
        dcfg = from_dict(DataConfig, {"pii": {"modes": {"IPV4": "off", "IPV6": "off"}}, "split": {"seed": seed}})
        prep = prepare([out / "domain" / "raw.jsonl"], out / "data", dcfg, log=lambda *a, **k: None)
        facts["prepare"] = {
            "records_in": prep.records_in,
            "records_kept": prep.records_kept,
            "dropped": prep.dropped,
            "splits": prep.splits,
            "manifest_sha256": prep.manifest_sha256,
            "pii_findings": prep.report.get("pii_findings", {}),
            "pii_records": prep.report.get("pii_records_with_findings"),
        }
        log(f"      kept {prep.records_kept}/{prep.records_in}; dropped {prep.dropped}; splits {prep.splits}")

    train_records = read_jsonl(out / "data" / "train.jsonl")
    pre = out / "pretrain"
    with clock.stage("tokenizer", f"tokenizer: byte-level BPE, {plan.vocab_size} tokens"):
        rows = pretraining_text(out / "corpus", train_records, plan.pretrain_bytes, seed)
        write_jsonl(pre / "pretrain.jsonl", rows)
        tok = train_bpe([pre / "pretrain.jsonl"], plan.vocab_size, pre / "tokenizer")
        facts["pretrain_text"] = {"documents": len(rows), "bytes": (pre / "pretrain.jsonl").stat().st_size}

    mcfg = get_preset("tiny", vocab_size=tok.vocab_size, **plan.model)
    with clock.stage(
        "pretrain",
        f"pretraining a {count_params(mcfg) / 1e6:.1f}M-parameter Llama from scratch, {plan.pretrain_steps} steps",
    ):
        pcfg = train_config(
            method="pretrain",
            out_dir=str(pre / "run"),
            seed=seed,
            tokenizer=str(pre / "tokenizer"),
            model={"preset": "tiny", "overrides": plan.model},
            data={"train": [str(pre / "pretrain.jsonl")], "val_fraction": 0.02, "seq_len": plan.pretrain_seq},
            optim={"lr": plan.pretrain_lr, "warmup_steps": max(1, plan.pretrain_steps // 10), "weight_decay": 0.1},
            eval={"every": max(1, plan.pretrain_steps // 4), "max_batches": 8},
            checkpoint={"every": 0, "keep_last": 1},
            log={"every": 10},
            micro_batch=plan.pretrain_batch,
            max_steps=plan.pretrain_steps,
            device="cpu",
        )
        pr = train(pcfg)
        facts["pretrain"] = {
            "params": count_params(mcfg),
            "steps": pr.steps,
            "tokens": pr.tokens,
            "final": pr.final,
            "model": str(pr.output),
        }

    ft = out / "finetune"
    with clock.stage(
        "finetune", f"LoRA fine-tuning (r={plan.lora_r}) on the prepared training split, {plan.finetune_steps} steps"
    ):
        fcfg = train_config(
            method="lora",
            out_dir=str(ft),
            seed=seed,
            model={"path": str(pr.output)},
            data={"dir": str(out / "data"), "seq_len": 512},
            lora={"r": plan.lora_r, "alpha": 2.0 * plan.lora_r, "dropout": 0.0, "target_modules": LORA_TARGETS},
            optim={"lr": plan.finetune_lr, "warmup_steps": max(1, plan.finetune_steps // 10), "weight_decay": 0.0},
            eval={"every": max(1, plan.finetune_steps // 3), "max_batches": 8},
            checkpoint={"every": 0, "keep_last": 1},
            log={"every": 10},
            micro_batch=plan.finetune_batch,
            max_steps=plan.finetune_steps,
            device="cpu",
        )
        fr = train(fcfg)
        facts["finetune"] = {"steps": fr.steps, "tokens": fr.tokens, "final": fr.final, "adapter": str(fr.output)}

    with clock.stage("merge", "merging the adapter into the base model"):
        from yunque.formats.peft import merge_adapter

        merged = merge_adapter(pr.output, fr.output, out / "model")
        facts["merge"] = {"modules": len(merged["modules"]), "out": str(out / "model")}

    with clock.stage("evaluate", "evaluating base vs fine-tuned on the held-out test split"):
        from yunque.demo.scoring import evaluate_pair

        facts["eval"] = evaluate_pair(
            pr.output, out / "model", out / "data" / "test.jsonl", out / "eval", limit=plan.test_limit, log=log
        )
    result.seconds = round(time.perf_counter() - clock.t0, 1)
    facts["stages"] = result.stages
    facts["seconds"] = result.seconds
    write_report(result, log)
    return result
