"""Base versus fine-tuned on the demo's test split: the evaluation runner's metrics plus task accuracy.

The runner (`yunque.evaluate.evaluate`) generates greedily and gives exact match, ROUGE and
the perplexity of the reference answer. Task accuracy is scored here per task with the demo's
own exact rule (`domain.answers_match`: case and whitespace only, so "203.0.113.7, 5" must be
exactly right); the runner's exact match also drops punctuation and articles. The task of a
test record is read from its system prompt, which survives `data prepare`.
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


def task_scores(records: list[dict], predictions: list[str]) -> dict[str, dict]:
    """{"all": {...}, task: {"n", "correct", "accuracy"}} with accuracy in percent."""
    out: dict[str, dict] = {}
    for rec, pred in zip(records, predictions, strict=True):
        task = domain.task_of(rec["messages"]) or "unknown"
        ok = domain.answers_match(pred, rec["messages"][-1]["content"])
        for key in ("all", task):
            s = out.setdefault(key, {"n": 0, "correct": 0})
            s["n"] += 1
            s["correct"] += ok
    for s in out.values():
        s["accuracy"] = 100.0 * s["correct"] / s["n"]
    return out


def evaluate_pair(
    base_dir: str | Path,
    tuned_dir: str | Path,
    test_path: str | Path,
    out_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    log=None,
) -> dict:
    """Evaluate both models on the same examples; writes eval/<name>.jsonl predictions, returns the numbers.

    Each task is generated with its own token budget (its longest reference + 4): a model that
    has not learned to stop (the base) would otherwise write the longest answer's budget for
    every one-word answer. `log` gets the runner's progress lines (None: silent)."""
    from yunque.evaluate.loading import load_for_eval
    from yunque.evaluate.runner import evaluate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = _records(Path(test_path), limit)
    by_task: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_task.setdefault(domain.task_of(rec["messages"]) or "unknown", []).append(i)
    results = {}
    for name, model_dir in (("base", Path(base_dir)), ("fine-tuned", Path(tuned_dir))):
        if log is not None:
            log(f"      {name} model: {len(records)} test examples in {len(by_task)} tasks")
        model, tok = load_for_eval(model_dir)
        preds = [""] * len(records)
        sums: dict[str, float] = {}
        timing: dict[str, float] = {}
        for task, idx in sorted(by_task.items()):
            part = out / f"test.{task}.jsonl"
            part.write_text("".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in idx), encoding="utf-8")
            longest = max(len(tok.encode(records[i]["messages"][-1]["content"])) for i in idx)
            # The runner's n/N lines only; its stage-start lines ("... ...") would triple the output.
            say = (
                None
                if log is None
                else (
                    lambda line, where=f"{name}, {task}": (
                        None if line.endswith(" ...") else log(f"      {where}: {line}")
                    )
                )
            )
            r = evaluate(
                model_dir,
                part,
                metrics=["exact_match", "rouge", "perplexity"],
                max_new_tokens=longest + 4,
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
        metrics = {k: v / len(records) for k, v in sums.items()}
        if "perplexity" in metrics:
            metrics["perplexity"] = math.exp(metrics["perplexity"])
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for rec, pred in zip(records, preds):
                f.write(
                    json.dumps(
                        {
                            "task": domain.task_of(rec["messages"]),
                            "source": rec.get("source"),
                            "reference": rec["messages"][-1]["content"],
                            "prediction": pred,
                            "correct": domain.answers_match(pred, rec["messages"][-1]["content"]),
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        results[name] = {
            "model": str(model_dir),
            "examples": len(records),
            "tasks": task_scores(records, preds),
            "metrics": {k: round(v, 4) for k, v in metrics.items()},
            "timing": {k: round(v, 2) for k, v in timing.items()},
        }
    return results


def examples(eval_dir: str | Path, per_task: int = 1) -> list[dict]:
    """A few fine-tuned predictions per task (right and wrong ones alike) for the report."""
    rows = _records(Path(eval_dir) / "fine-tuned.jsonl", None)
    base = _records(Path(eval_dir) / "base.jsonl", None)
    picked, seen = [], {}
    for row, b in zip(rows, base):
        if seen.get(row["task"], 0) < per_task:
            seen[row["task"]] = seen.get(row["task"], 0) + 1
            picked.append({**row, "base_prediction": b["prediction"]})
    return picked
