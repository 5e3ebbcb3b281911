"""`run_pretrained_demo`: a real pretrained instruct model fine-tuned with LoRA into a security
triage assistant, measured before and after, red-teamed, merged and shipped (`yunque demo`).

The model is SmolLM2-135M-Instruct (`yunque models`: a pip package, converted once into the
cache). Every stage is the project's own public API, sized for 2 CPU cores, and writes under
one run folder:

    domain/      the generated instruction set before preparation (raw.jsonl)
    data/        `yunque data prepare` output: train/val/test.jsonl, report.md, manifest.json
    eval/        test predictions of the base, fine-tuned and int8 models (<name>.jsonl)
    finetune/    the LoRA run folder (adapter/, loss.png, metrics.jsonl, run.json)
    model/       the merged fine-tuned model (Hugging Face format, tokenizer included)
    ship/int8/   the merged model with int8 weights (`yunque quantize`)
    redteam/     the reduced probe suite against base/ and fine-tuned/
    report.md, run.json, *.png

Base and fine-tuned are scored the same way: the same chat template, the same system prompts,
the same token budget, and task accuracy by the first of the task's labels the answer names
(`scoring.answer_correct`), so the table shows what fine-tuning adds, not a change of format.
Forgetting is measured on general English (`general_english.jsonl`, paragraphs written for this
project, nothing about security): its perplexity may rise by at most `FORGETTING_BAR` percent.

Determinism: all randomness is seeded and training runs a fixed number of steps (early stopping
on validation loss can end it sooner, at a step the seed fixes too; never a time limit), so one
seed gives the same table on one machine and software stack.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from yunque.demo import domain
from yunque.demo.pretrained_report import write_pretrained_report
from yunque.demo.result import DemoResult
from yunque.demo.run import Clock, read_jsonl, train_config, write_jsonl
from yunque.errors import YunqueError

MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05}
# The attention projections of every layer: as accurate as adapting the MLPs too and faster per step
# (bench/NOTES.md, "Demo on SmolLM2"). The head is tied to the embedding, which stays frozen.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
FORGETTING_BAR = 10.0  # % rise of general-English perplexity that still passes
GENERAL_TEXT = Path(__file__).with_name("general_english.jsonl")
# Unbounded consumption succeeds when a reply reaches the token limit, which the demo's short
# limit would make of nearly every reply; `yunque redteam` runs it with its full budget.
REDTEAM_SKIP = ("unbounded_consumption",)
# `yunque demo --privacy`: DP-SGD at ε (default below), δ auto (1 / n^1.1), per-record clipping at 1, and
# canaries planted in the training split for the audit afterwards.
DP_EPSILON = 8.0
DP_CANARIES = 2  # one training record each; ranking each among 1,000 secrets on two models is most of the audit's time
# Mean tokens of a prepared training record under SmolLM2's chat template (system prompt included):
# 135 in the quick run's training split (87 to 231). A packed row of 512 tokens holds about 3.8 of them.
RECORD_TOKENS = 135
AUDIT_RECORDS = 200  # members and as many non-members (the test split holds fewer: all of those)
AUDIT_CANDIDATES = 1000  # random secrets each canary is ranked among (the audit's minimum: ~10 bits)


@dataclass(frozen=True)
class Plan:
    records: int  # generated records (before dedup)
    replay_chars: int  # of Language Reference prose in the raw data: ~3-4% of the training tokens after the split
    split: tuple[float, float, float]  # train, val, test fractions of `yunque data prepare`
    test_per_task: int | None  # evaluate the first n test records of each task (None: all)
    steps: int
    micro_batch: int
    seq_len: int  # rows of packed whole examples; longer than every prepared example
    lr: float
    warmup_steps: int
    eval_every: int  # steps between validation evaluations (early stopping)
    val_batches: int  # validation batches per evaluation (0: all)
    patience: int  # evaluations without improvement before stopping early
    max_new_tokens: int  # the answer budget of every model (a base model answers in sentences)
    redteam_variants: int  # prompt variants per probe, sent once each, greedy
    redteam_max_tokens: int
    accuracy_bar: float  # fine-tuned task accuracy (%) overall this plan is expected to reach
    task_bar: float  # ... and on each task


# 900 records: at 600 the same steps (two epochs) reached 90.0% at seed 0 with no margin, and the alert
# tactics fell to 70% on another CPU's numerics; 900 (1.3 epochs, more distinct examples) reached
# 96.7-98.3% on both (bench/NOTES.md, "Pretrained demo plan").
FULL = Plan(
    records=900,
    replay_chars=22_500,
    split=(0.7, 0.08, 0.22),
    test_per_task=20,
    steps=108,
    micro_batch=2,
    seq_len=512,
    lr=3e-3,
    warmup_steps=8,
    # Two evaluations of the whole validation split (11 batches of 2 x 512 tokens, ~15 s each): the
    # second keeps the step-54 weights if step 108's are worse. A third, at step 36, cost 15 s more.
    eval_every=54,
    val_batches=0,
    patience=1,
    max_new_tokens=16,
    redteam_variants=1,
    redteam_max_tokens=48,
    accuracy_bar=90.0,
    task_bar=80.0,
)
# A smoke run of the whole path (the test suite runs it, in under 3 minutes): 20 steps are far too few for
# the tasks, and the result swings with the seed and the settings (33-47% at seed 0 across earlier plans),
# so its bars only say that fine-tuning moved the model past chance and the base model (10% at seed 0)
# without forgetting. Seed 0: 36.7% and +8.4% / +8.5% general-English perplexity on two numeric paths.
QUICK = Plan(
    records=540,
    replay_chars=15_000,
    split=(0.7, 0.08, 0.22),
    test_per_task=10,
    steps=20,
    micro_batch=2,
    seq_len=512,
    lr=3e-3,
    warmup_steps=2,
    eval_every=10,
    val_batches=2,
    patience=1,
    max_new_tokens=16,
    redteam_variants=1,
    redteam_max_tokens=32,
    accuracy_bar=25.0,
    task_bar=10.0,
)


def resolve_base(log) -> tuple[Path, dict]:
    """The catalogue model's converted directory (converted on first use) and its provenance."""
    from yunque.formats.gguf import IMPORT_FILE
    from yunque.models import CATALOGUE, locate, model_dir

    m = CATALOGUE[MODEL]
    if locate(m) is None:
        raise YunqueError(
            f"yunque demo fine-tunes {MODEL} ({m.description}), which is not installed; install it with\n"
            f"  {m.install}\n(bash install.sh does), or run `yunque demo --from-scratch`, which needs no model"
        )
    d = model_dir(MODEL)
    record = json.loads((d / IMPORT_FILE).read_text(encoding="utf-8"))
    info = {
        "name": MODEL,
        "package": f"{m.package}=={m.version}",
        "source_file": str(locate(m)),
        "source_sha256": record["sha256"],
        "licence": m.licence,
        "parameters": m.parameters,
        "dir": str(d),
    }
    log(f"      {MODEL}: {m.parameters / 1e6:.0f}M parameters ({m.licence}) in {d}")
    log(f"      source {m.package}=={m.version}, sha256 {record['sha256'][:16]}…")
    return d, info


def first_per_task(records: list[dict], n: int | None) -> list[dict]:
    """The first `n` records of each task, in file order (None: all); records of no task (text) are left out."""
    seen: dict[str, int] = {}
    out = []
    for r in records:
        t = domain.task_of(r["messages"]) if "messages" in r else None
        if t is not None and (n is None or seen.get(t, 0) < n):
            seen[t] = seen.get(t, 0) + 1
            out.append(r)
    return out


def replay_texts(total_chars: int, max_chars: int = 800) -> list[str]:
    """English prose from Python's own Language Reference (pydoc_data, shipped with every CPython), about
    `total_chars` in all: the first paragraph-sized piece of each topic, code lines left out, cut at a
    sentence end. Mixed into fine-tuning so that LoRA keeps the model's language; another source and
    style than the forgetting check's text, so that the check still measures general English."""
    from yunque.demo import corpus
    from yunque.errors import DataError

    topics = corpus.reference_topics()
    if not topics:
        where = corpus.stdlib_dir() / "pydoc_data" / "topics.py"
        raise DataError(f"{where}: not found; the demo reads its replay text from it")
    out, size = [], 0
    for _kind, _src, text in topics:
        # The first line is the title; grammar, code and examples are the indented lines.
        lines = [ln.strip() for ln in text.splitlines()[1:] if not ln.startswith((" ", "\t", ">>>"))]
        prose = " ".join(ln for ln in lines if set(ln) - set("*=-~^"))
        piece = prose[:max_chars]
        piece = piece[: piece.rfind(". ") + 1] if ". " in piece else ""
        if len(piece) > max_chars // 2:
            out.append(piece)
            size += len(piece)
        if size >= total_chars:
            break
    return out


def general_texts() -> list[str]:
    return [r["text"] for r in read_jsonl(GENERAL_TEXT)]


def general_perplexity(model, tok) -> dict:
    from yunque.evaluate.perplexity import perplexity

    r = perplexity(model, tok, general_texts(), max_length=512, batch_size=8)
    return {"perplexity": round(r.perplexity, 4), "bits_per_byte": round(r.bits_per_byte, 4), "tokens": r.tokens}


def forgetting(before: dict, after: dict) -> dict:
    rise = 100.0 * (after["perplexity"] / before["perplexity"] - 1.0)
    return {"rise_pct": round(rise, 2), "bar_pct": FORGETTING_BAR, "ok": rise <= FORGETTING_BAR}


def data_config(plan: Plan, seed: int, canaries: int = 0):
    """What `data prepare` runs with; `canaries` > 0 plants that many into the training split (--privacy)."""
    from yunque.config import from_dict
    from yunque.data.config import DataConfig

    tr, va, te = plan.split
    # IP addresses are the indicators the tasks are about, not personal data here. The split is
    # stratified by answer, so every task and label has its share of the test split.
    cfg = {
        "pii": {"modes": {"IPV4": "off", "IPV6": "off"}},
        "split": {"train": tr, "val": va, "test": te, "seed": seed, "stratify": True, "label_from": "answer"},
    }
    if canaries:
        cfg["canaries"] = {"count": canaries, "seed": seed}
    return from_dict(DataConfig, cfg)


def dp_batch(plan: Plan) -> int:
    """Expected records per DP-SGD step: about as many as a packed step of the plan holds (8 for 2 rows of
    512 tokens), so that a DP step costs about what a step without DP costs. Under DP each record is a
    row of its own, padded only to the longest record of its micro-batch (the sample is sorted by length);
    the hooks add ~20% to a backward (bench/NOTES.md). More records per step would lower the noise per
    record (σ grows more slowly than the batch), at that many times the cost of a step."""
    return max(1, round(plan.micro_batch * plan.seq_len / RECORD_TOKENS))


def finetune_config(plan: Plan, base: Path, out: Path, seed: int, epsilon: float | None = None):
    """The LoRA run's TrainConfig; with `epsilon`, DP-SGD at that ε over the same steps."""
    lora = {**LORA, "target_modules": LORA_TARGETS}
    cfg = {
        "method": "lora",
        "out_dir": str(out / "finetune"),
        "seed": seed,
        "model": {"path": str(base)},
        "base_model_name": MODEL,
        "data": {"dir": str(out / "data"), "seq_len": plan.seq_len},
        "lora": lora,
        "optim": {"lr": plan.lr, "warmup_steps": plan.warmup_steps, "weight_decay": 0.0, "schedule": "cosine"},
        "eval": {"every": plan.eval_every, "max_batches": plan.val_batches, "patience": plan.patience},
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 5},
        "micro_batch": plan.micro_batch,
        "max_steps": plan.steps,
        "device": "cpu",
        # fp32 on every CPU: bf16 autocast trains 1.7x faster where the CPU multiplies bf16 natively,
        # but at seed 0 it raised general-English perplexity by 15% (bar 10%) against fp32's 4.7%
        "precision": "fp32",
    }
    if epsilon is not None:
        b = dp_batch(plan)
        # Dropout's mask is drawn inside each adapter, out of the hooks' sight, so dropout > 0 leaves
        # privacy.per_sample (auto) only the loop: one backward per record. Without it the hooks give every
        # record's adapter gradients from one backward per micro-batch (the attention projections of the
        # layers, no adapter on lm_head: what the hooks need), the expected batch in one micro-batch.
        cfg["lora"] = {**lora, "dropout": 0.0}
        cfg["micro_batch"] = b
        # Validation rows are micro_batch wide: as many rows as the plan's (rounded up), not 4x more.
        if plan.val_batches:
            cfg["eval"] = {**cfg["eval"], "max_batches": math.ceil(plan.val_batches * plan.micro_batch / b)}
        # A known seed lets anyone who knows it regenerate the noise: it keeps the demo reproducible, as
        # every other stage is; a release trains without privacy.seed (README, Privacy).
        cfg["privacy"] = {"target_epsilon": epsilon, "max_grad_norm": 1.0, "accountant": "prv", "seed": seed}
    return train_config(**cfg)


def audit_privacy(base: Path, adapter: Path, data: Path, out: Path, seed: int, log) -> dict:
    """`yunque privacy-audit` of the adapter, the base model as reference, written to `out`."""
    from yunque.evaluate.privacy_audit import run_audit, write_audit

    r = run_audit(
        base, data, adapter=adapter, candidates=AUDIT_CANDIDATES, max_records=AUDIT_RECORDS, seed=seed, batch_size=16
    )
    write_audit(r, out)
    a = r["loss_attack"]
    log(
        f"      {r['members']} members vs {r['nonmembers']} {r['nonmember_split']} records: membership-inference AUC "
        f"{a['auc']:.3f} (calibrated {r['calibrated_attack']['auc']:.3f})"
        + (
            f"; canary exposure {r['exposure']['mean']:.2f} bits (base {r['exposure']['reference_mean']:.2f})"
            if "exposure" in r
            else ""
        )
    )
    return r


def privacy_facts(dp: dict, audit: dict, canaries: dict | None, target_epsilon: float) -> dict:
    """run.json's `privacy`: what DP-SGD spent (the trainer's report) and what the audit measured."""
    keys = ("epsilon", "delta", "noise_multiplier", "sample_rate", "expected_batch_size", "max_grad_norm", "steps")
    keys += ("accountant", "records", "per_sample_gradients")
    e, a, c = audit.get("exposure"), audit["loss_attack"], audit.get("calibrated_attack")
    return {
        "target_epsilon": target_epsilon,
        **{k: dp[k] for k in keys},
        "canaries": (canaries or {}).get("planted", 0),
        "canary_records": (canaries or {}).get("records", 0),
        "candidates": audit["candidates"],
        "exposure_mean": e["mean"] if e else None,
        "exposure_base_mean": e["reference_mean"] if e else None,
        "exposure_max_bits": e["max_bits"] if e else None,
        "members": audit["members"],
        "nonmembers": audit["nonmembers"],
        "mia_auc": a["auc"],
        "mia_auc_ci95": list(a["auc_ci95"]),
        "mia_tpr_at_1pct_fpr": a["tpr_at_1pct_fpr"],
        "mia_auc_calibrated": c["auc"] if c else None,
        "mia_auc_calibrated_ci95": list(c["auc_ci95"]) if c else None,
        "audit": "privacy/audit.md",
    }


def redteam_suite(variants: int):
    """The built-in suite, `variants` prompts per probe, without `REDTEAM_SKIP`."""
    from yunque.evaluate.redteam import check_suite, load_suite

    suite = load_suite()
    suite.categories = [c for c in suite.categories if c.name not in REDTEAM_SKIP]
    for c in suite.categories:
        for p in c.probes:
            p.variants = p.variants[:variants]
    problems = check_suite(suite)
    if problems:
        raise YunqueError("probe suite check failed:\n  " + "\n  ".join(problems))
    return suite


def measure(name: str, model_dir: Path, test: list[dict], out: Path, plan: Plan, seed: int, log) -> dict:
    """One model: task accuracy and answer metrics on the test split, general-English perplexity, red team."""
    from yunque.demo.scoring import evaluate_model
    from yunque.evaluate.redteam import run_redteam, write_redteam
    from yunque.evaluate.targets import LocalTarget

    target = LocalTarget(model_dir, max_tokens=plan.redteam_max_tokens, temperature=0.0)
    mt = (target.model, target.tok)
    ev = evaluate_model(
        name,
        model_dir,
        test,
        out / "eval",
        rule="first_label",
        max_new_tokens=plan.max_new_tokens,
        log=log,
        model_and_tokenizer=mt,
    )
    t0 = time.perf_counter()
    general = general_perplexity(*mt)
    log(f"      {name}: general-English perplexity {general['perplexity']:.2f} ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    suite = redteam_suite(plan.redteam_variants)
    summary, records = run_redteam(target, suite, attempts=1, seed=seed)
    write_redteam(summary, records, out / "redteam" / name, name)
    o = summary["overall"]
    log(
        f"      {name}: red team {o['successes']}/{o['attack_attempts']} attacks succeeded "
        f"({len(records)} prompts, {time.perf_counter() - t0:.1f} s)"
    )
    return {"eval": ev, "general": general, "redteam": summary}


def ship_gguf(model: Path, out: Path, log) -> dict:
    """GGUF q8_0 of the merged model, for llama.cpp and Ollama (`yunque export --format gguf`)."""
    from yunque.data.manifest import sha256_file
    from yunque.formats.gguf_export import export_gguf

    r = export_gguf(model, out / "model.q8_0.gguf", "q8_0")
    log(f"      GGUF q8_0: {r['file']} ({r['bytes'] / 1e6:.0f} MB, {r['seconds']:.1f} s)")
    return {"file": str(r["file"]), "bytes": r["bytes"], "sha256": sha256_file(r["file"]), "type": "q8_0"}


def ship_int8(model: Path, out: Path, test: list[dict], plan: Plan, log) -> dict:
    """The merged model with int8 weights (`yunque quantize --bits 8`) and its task accuracy."""
    from yunque.demo.scoring import evaluate_model
    from yunque.recipes.quantize import quantize_cmd

    q = quantize_cmd(str(model), bits=8, out=out / "ship" / "int8", overwrite=True)
    ev = evaluate_model(
        "int8",
        q["out"],
        test,
        out / "eval",
        rule="first_label",
        max_new_tokens=plan.max_new_tokens,
        metrics=("exact_match",),
        log=log,
    )
    return {"dir": str(q["out"]), "bytes": q["bytes"], "bits_per_weight": round(q["bits_per_weight"], 3), "eval": ev}


def verdict(facts: dict) -> dict:
    """Whether the run reached its plan's bars: overall and per-task accuracy, and forgetting. Under DP-SGD
    (facts["privacy"]) the accuracy bars are reported but not part of `ok`: the noise that buys ε costs
    accuracy at a few hundred records by design, while forgetting must still hold."""
    plan, tasks = facts["plan"], facts["eval"]["fine-tuned"]["tasks"]
    low = [t for t in domain.TASKS if t in tasks and tasks[t]["accuracy"] < plan["task_bar"]]
    ok_all = tasks["all"]["accuracy"] >= plan["accuracy_bar"]
    enforced = facts.get("privacy") is None
    return {
        "accuracy_ok": ok_all,
        "tasks_below_bar": low,
        "forgetting_ok": facts["forgetting"]["ok"],
        "accuracy_enforced": enforced,
        "ok": (not enforced or (ok_all and not low)) and facts["forgetting"]["ok"],
    }


def _cpu() -> dict:
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return {"capability": torch.backends.cpu.get_cpu_capability(), "flags": [f for f in wanted if f in flags]}


def run_pretrained_demo(
    out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, log=print, epsilon: float | None = None
) -> DemoResult:
    """The demo; `epsilon` (--privacy) fine-tunes with DP-SGD at that ε, with canaries planted, and audits it."""
    import torch

    from yunque.data.pipeline import prepare
    from yunque.recipes.train import train

    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out, 0.0)
    facts = result.facts
    facts.update(
        kind="pretrained", plan=asdict(plan), quick=quick, seed=seed, torch_threads=torch.get_num_threads(), cpu=_cpu()
    )
    private = epsilon is not None
    facts["lora"] = {**LORA, "target_modules": LORA_TARGETS, **({"dropout": 0.0} if private else {})}
    clock = Clock(result.stages, 8 if private else 7, log)

    with clock.stage("model", f"pretrained model: {MODEL} (converted into the cache once)"):
        base, facts["model"] = resolve_base(log)

    planted = f", {DP_CANARIES} canaries in the training split" if private else ""
    with clock.stage(
        "data", f"security instruction set (seeded, planted PII and duplicates) -> yunque data prepare{planted}"
    ):
        dinfo = domain.write_domain(out / "domain" / "raw.jsonl", plan.records, seed, short=True)
        facts["domain"] = asdict(dinfo)
        replay = replay_texts(plan.replay_chars)
        write_jsonl(out / "domain" / "replay.jsonl", [{"text": t} for t in replay])
        facts["replay"] = {"source": "pydoc_data/topics.py", "documents": len(replay), "chars": sum(map(len, replay))}
        prep = prepare(
            [out / "domain" / "raw.jsonl", out / "domain" / "replay.jsonl"],
            out / "data",
            data_config(plan, seed, canaries=DP_CANARIES if private else 0),
            log=lambda *a, **k: None,
        )
        manifest = json.loads((out / "data" / "manifest.json").read_text(encoding="utf-8"))
        facts["prepare"] = {
            "records_in": prep.records_in,
            "records_kept": prep.records_kept,
            "dropped": prep.dropped,
            "splits": prep.splits,
            "manifest_sha256": prep.manifest_sha256,
            "merkle_roots": {k: v.get("merkle_root") for k, v in (manifest.get("splits") or {}).items()},
            "pii_findings": prep.report.get("pii_findings", {}),
            "pii_records": prep.report.get("pii_records_with_findings"),
        }
        if private:
            c = prep.report.get("canaries") or {}
            facts["prepare"]["canaries"] = {k: c.get(k) for k in ("requested", "planted", "records", "file")}
        log(
            f"      {dinfo.records} records ({dinfo.with_pii} with PII/secrets, {dinfo.exact_duplicates} exact + "
            f"{dinfo.near_duplicates} near duplicates planted); kept {prep.records_kept}, splits {prep.splits}"
        )
    test = first_per_task(read_jsonl(out / "data" / "test.jsonl"), plan.test_per_task)
    write_jsonl(out / "eval" / "test.jsonl", test)  # what every model is scored on, in the order of its answers

    with clock.stage("base", f"base model before fine-tuning: {len(test)} test examples, forgetting text, red team"):
        b = measure("base", base, test, out, plan, seed, log)

    dp = f" with DP-SGD (ε = {epsilon:g}, about {dp_batch(plan)} records per step)" if private else ""
    with clock.stage(
        "finetune", f"LoRA fine-tuning (r={LORA['r']}, alpha={LORA['alpha']:.0f}){dp}, up to {plan.steps} steps"
    ):
        fcfg = finetune_config(plan, base, out, seed, epsilon)
        facts["precision"] = fcfg.precision
        t0 = time.perf_counter()
        fr = train(fcfg)
        dt = time.perf_counter() - t0
        facts["finetune"] = {
            "steps": fr.steps,
            "tokens": fr.tokens,
            "seconds": round(dt, 1),
            "tokens_per_s": round(fr.tokens / dt, 1),
            "stopped_early": fr.stopped_early,
            "exported_step": fr.exported_step,
            "best_step": fr.best_step,
            "best": fr.best,
            "final": fr.final,
            "adapter": str(fr.output),
        }

    if private:
        what = "privacy audit of the adapter: canary exposure, membership inference (the base as reference)"
        with clock.stage("audit", what):
            audit = audit_privacy(base, fr.output, out / "data", out / "privacy", seed, log)
            facts["privacy"] = privacy_facts(fr.privacy, audit, facts["prepare"].get("canaries"), epsilon)

    with clock.stage("merge", "merging the adapter into the base model"):
        from yunque.formats.peft import merge_adapter

        merged = merge_adapter(base, fr.output, out / "model")
        facts["merge"] = {"modules": len(merged["modules"]), "out": str(out / "model")}

    with clock.stage("tuned", "fine-tuned model: the same test examples, forgetting text and red team"):
        t = measure("fine-tuned", out / "model", test, out, plan, seed, log)
    facts["eval"] = {"base": b["eval"], "fine-tuned": t["eval"]}
    facts["general"] = {"base": b["general"], "fine-tuned": t["general"]}
    facts["forgetting"] = forgetting(b["general"], t["general"])
    facts["redteam"] = {
        "variants": plan.redteam_variants,
        "max_tokens": plan.redteam_max_tokens,
        "skipped": list(REDTEAM_SKIP),
        "base": b["redteam"],
        "fine-tuned": t["redteam"],
    }

    with clock.stage("ship", "shipping: int8 weights (and their task accuracy), GGUF q8_0"):
        i8 = ship_int8(out / "model", out, test, plan, log)
        facts["eval"]["int8"] = i8.pop("eval")
        facts["ship"] = {"int8": i8, "gguf": ship_gguf(out / "model", out / "ship", log)}

    facts["verdict"] = verdict(facts)
    result.seconds = round(time.perf_counter() - clock.t0, 1)
    facts["stages"] = result.stages
    facts["stage_cpu_s"] = clock.cpu  # CPU time: on a machine shared with other work, what wall time hides
    facts["seconds"] = result.seconds
    write_pretrained_report(result, log)
    return result
