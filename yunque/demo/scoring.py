"""Models on the demo's test split: the evaluation runner's metrics plus task accuracy.

The runner (`yunque.evaluate.evaluate`) generates greedily and gives exact match, ROUGE and
the perplexity of the reference answer. Task accuracy is scored here per task, by one of two
rules: `exact` (the from-scratch demo: the whole answer, case and whitespace aside, as
`domain.answers_match`) or `first_label` (the pretrained demo: the first of the task's labels the
answer names, so an instruct model that answers in a sentence is scored on what it said). The
runner's exact match also drops punctuation and articles. The task of a test record is read from
its system prompt, which survives `data prepare`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from yunque.demo import domain

CHANCE = {"auth_triage": 100 / 3, "phishing": 50.0, "alert_tactic": 100 / 6}  # % a guesser gets without reading


def _records(path: Path, limit: int | None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return recs[:limit] if limit else recs


def answer_correct(task: str | None, prediction: str, reference: str, rule: str = "exact") -> bool:
    """exact: the whole answer is the reference (`domain.answers_match`); first_label: the first of the
    task's labels that the answer names is the reference (`metrics.parse_label`), which gives a chatty
    model that writes "This is a brute-force attack." its due."""
    if rule == "exact" or task not in domain.LABELS:
        return domain.answers_match(prediction, reference)
    from yunque.evaluate.metrics import parse_label

    return parse_label(prediction, domain.LABELS[task]) == reference


def task_scores(records: list[dict], predictions: list[str], rule: str = "exact") -> dict[str, dict]:
    """{"all": {...}, task: {"n", "correct", "accuracy"}} with accuracy in percent."""
    out: dict[str, dict] = {}
    for rec, pred in zip(records, predictions, strict=True):
        task = domain.task_of(rec["messages"]) or "unknown"
        ok = answer_correct(task, pred, rec["messages"][-1]["content"], rule)
        for key in ("all", task):
            s = out.setdefault(key, {"n": 0, "correct": 0})
            s["n"] += 1
            s["correct"] += ok
    for s in out.values():
        s["accuracy"] = 100.0 * s["correct"] / s["n"]
    return out


def evaluate_model(
    name: str,
    model_dir: str | Path,
    records: list[dict],
    out_dir: str | Path,
    *,
    rule: str = "exact",
    max_new_tokens: int | None = None,
    metrics: tuple[str, ...] = ("exact_match", "rouge", "perplexity"),
    batch_size: int = 16,
    log=None,
    model_and_tokenizer=None,
) -> dict:
    """One model on `records` (chat records of the demo's tasks); writes out_dir/<name>.jsonl.

    Each task is generated with its own token budget, its longest reference + 4 unless
    `max_new_tokens` is given: a model that has not learned to stop (a base model) would otherwise
    write the longest answer's budget for every one-word answer. `log` gets the runner's progress
    lines (None: silent); `model_and_tokenizer` skips loading."""
    from yunque.evaluate.loading import load_for_eval
    from yunque.evaluate.runner import evaluate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_task.setdefault(domain.task_of(rec["messages"]) or "unknown", []).append(i)
    if log is not None:
        log(f"      {name} model: {len(records)} test examples in {len(by_task)} tasks")
    model, tok = model_and_tokenizer or load_for_eval(model_dir)
    preds = [""] * len(records)
    sums: dict[str, float] = {}
    timing: dict[str, float] = {}
    for task, idx in sorted(by_task.items()):
        part = out / f"test.{task}.jsonl"
        part.write_text("".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in idx), encoding="utf-8")
        budget = max_new_tokens or max(len(tok.encode(records[i]["messages"][-1]["content"])) for i in idx) + 4
        # The runner's n/N lines only; its stage-start lines ("... ...") would triple the output.
        where = f"{name}, {task}"
        say = (
            None
            if log is None
            else (lambda line, w=where: None if line.endswith(" ...") else log(f"      {w}: {line}"))
        )
        r = evaluate(
            model_dir,
            part,
            metrics=list(metrics),
            max_new_tokens=budget,
            batch_size=batch_size,
            model_and_tokenizer=(model, tok),
            progress=say,
        )
        for i, p in zip(idx, r.predictions):
            preds[i] = p.get("prediction", "")
        for k, v in r.metrics.items():  # example-weighted means over the tasks (perplexity: geometric)
            v = math.log(max(v, 1e-12)) if k == "perplexity" else v
            sums[k] = sums.get(k, 0.0) + v * len(idx)
        for k, v in r.timing.items():
            timing[k] = timing.get(k, 0.0) + v
    means = {k: v / len(records) for k, v in sums.items()}
    if "perplexity" in means:
        means["perplexity"] = math.exp(means["perplexity"])
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for rec, pred in zip(records, preds):
            task, ref = domain.task_of(rec["messages"]), rec["messages"][-1]["content"]
            row = {"task": task, "source": rec.get("source"), "reference": ref, "prediction": pred}
            f.write(json.dumps({**row, "correct": answer_correct(task, pred, ref, rule)}, ensure_ascii=False) + "\n")
    return {
        "model": str(model_dir),
        "examples": len(records),
        "scoring": rule,
        "tasks": task_scores(records, preds, rule),
        "metrics": {k: round(v, 4) for k, v in means.items()},
        "timing": {k: round(v, 2) for k, v in timing.items()},
    }


def evaluate_pair(
    base_dir: str | Path,
    tuned_dir: str | Path,
    test_path: str | Path,
    out_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    log=None,
) -> dict:
    """Both models on the same test examples with exact scoring (`evaluate_model`); returns the numbers."""
    records = _records(Path(test_path), limit)
    return {
        name: evaluate_model(name, d, records, out_dir, batch_size=batch_size, log=log)
        for name, d in (("base", base_dir), ("fine-tuned", tuned_dir))
    }


def examples(eval_dir: str | Path, per_task: int = 1) -> list[dict]:
    """The first fine-tuned predictions of each task (right and wrong ones alike) beside the base's, for the report."""
    rows = _records(Path(eval_dir) / "fine-tuned.jsonl", None)
    base = _records(Path(eval_dir) / "base.jsonl", None)
    picked, seen = [], {}
    for row, b in zip(rows, base):
        if seen.get(row["task"], 0) < per_task:
            seen[row["task"]] = seen.get(row["task"], 0) + 1
            picked.append({**row, "base_prediction": b["prediction"]})
    return picked
