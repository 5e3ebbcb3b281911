"""Evaluation reports: eval.json (everything), eval.md (tables), predictions.jsonl, PNG charts.

With several results (base vs fine-tuned vs merged) the same files hold one table with the
models side by side; `eval.json` then has a "models" list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from yunque.evaluate import metrics as M
from yunque.evaluate.runner import EvalResult

LOWER_IS_BETTER = {"perplexity", "bits_per_byte"}
_NAMES = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "bleu": "BLEU",
    "chrf": "chrF",
    "exact_match": "Exact match",
    "accuracy": "Accuracy",
    "macro_f1": "Macro F1",
    "perplexity": "Perplexity",
    "bits_per_byte": "Bits per byte",
}


def _fmt(name: str, v: float) -> str:
    return f"{v:.4f}" if name == "bits_per_byte" else f"{v:.2f}"


def display_names(results: Sequence[EvalResult]) -> list[str]:
    """Column names: the model (or adapter) directory name, numbered when two would clash."""
    names = [r.name for r in results]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def metric_notes(results: Sequence[EvalResult]) -> dict[str, str]:
    """metric -> why its number should not be read here (BLEU on short references)."""
    if not any("bleu" in r.metrics for r in results):
        return {}
    refs = next(
        (
            [p["references"] for p in r.predictions]
            for r in results
            if r.predictions and all("references" in p for p in r.predictions)
        ),
        None,
    )
    note = M.bleu_note(refs) if refs else None
    return {"bleu": note} if note else {}


def metrics_table(results: Sequence[EvalResult], notes: dict[str, str] | None = None) -> str:
    names = list(dict.fromkeys(k for r in results for k in r.metrics))
    head = "| Metric | " + " | ".join(display_names(results)) + " |"
    rows = [head, "|---|" + "---:|" * len(results)]
    for n in names:
        vals = [r.metrics.get(n) for r in results]
        present = [v for v in vals if v is not None]
        best = (min if n in LOWER_IS_BETTER else max)(present) if len(results) > 1 and present else None
        cells = ["-" if v is None else (f"**{_fmt(n, v)}**" if v == best else _fmt(n, v)) for v in vals]
        arrow = " (lower is better)" if n in LOWER_IS_BETTER else ""
        flag = " (see note)" if n in (notes or {}) else ""
        rows.append(f"| {_NAMES.get(n, n)}{arrow}{flag} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _class_tables(r: EvalResult) -> str:
    c = r.classification
    lines = ["| Class | Precision | Recall | F1 | Support |", "|---|---:|---:|---:|---:|"]
    for label, v in c["per_class"].items():
        lines.append(f"| {label} | {v['precision']:.2f} | {v['recall']:.2f} | {v['f1']:.2f} | {v['support']} |")
    lines += [
        "",
        "Confusion matrix (rows: gold, columns: predicted)",
        "",
        "| gold \\ predicted | " + " | ".join(c["columns"]) + " |",
        "|---|" + "---:|" * len(c["columns"]),
    ]
    for label, row in zip(c["labels"], c["confusion"]):
        lines.append(f"| {label} | " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def markdown(results: Sequence[EvalResult]) -> str:
    r0 = results[0]
    parts = [
        f"# Evaluation: {Path(r0.data).name}",
        "",
        (
            f"{r0.examples} {r0.kind} examples from `{r0.data}`. Scores are percentages except perplexity "
            "and bits per byte. Exact match uses the normalisation in `yunque.evaluate.metrics`."
        ),
        "",
    ]
    for r, name in zip(results, display_names(results)):
        parts.append(
            f"- **{name}**: model `{r.model}`"
            + (f", adapter `{r.adapter}`" if r.adapter else "")
            + (f"; {r.timing['tokens_per_s']:.1f} generated tokens/s" if "tokens_per_s" in r.timing else "")
        )
    notes = metric_notes(results)
    parts += ["", metrics_table(results, notes), ""]
    for text in notes.values():
        parts += [f"Note: {text}", ""]
    for r, name in zip(results, display_names(results)):
        if r.classification:
            parts += [f"## {name}: per class", "", _class_tables(r), ""]
    return "\n".join(parts)


def charts(results: Sequence[EvalResult], out: Path) -> list[str]:
    """metrics.png (percentage metrics, grouped by model) and confusion_<model>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = [n for n in dict.fromkeys(k for r in results for k in r.metrics) if n not in LOWER_IS_BETTER]
    if names:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) * max(1, len(results)) ** 0.5 + 2), 3.5))
        w = 0.8 / len(results)
        for i, (r, label) in enumerate(zip(results, display_names(results))):
            xs = [j + i * w for j in range(len(names))]
            ax.bar(xs, [r.metrics.get(n, 0.0) for n in names], width=w, label=label)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(names))], [_NAMES.get(n, n) for n in names])
        ax.set_ylabel("score (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        written.append("metrics.png")
    for k, (r, label) in enumerate(zip(results, display_names(results))):
        if not r.classification:
            continue
        c = r.classification
        fig, ax = plt.subplots(figsize=(1 + 0.7 * len(c["columns"]), 1 + 0.6 * len(c["labels"])))
        ax.imshow(c["confusion"], cmap="Blues")
        ax.set_xticks(range(len(c["columns"])), c["columns"], rotation=45, ha="right")
        ax.set_yticks(range(len(c["labels"])), c["labels"])
        for i, row in enumerate(c["confusion"]):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(label, fontsize=9)
        fig.tight_layout()
        name = f"confusion_{k + 1}_{r.name}.png" if len(results) > 1 else "confusion.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def write_report(results: Sequence[EvalResult], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = results[0].to_json() if len(results) == 1 else {"models": [r.to_json() for r in results]}
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for r, label in zip(results, display_names(results)):
            fh.writelines(json.dumps({"model": label, **p}, ensure_ascii=False) + "\n" for p in r.predictions)
    payload["charts"] = charts(results, out)
    payload["notes"] = metric_notes(results)
    (out / "eval.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "eval.md").write_text(markdown(results) + "\n", encoding="utf-8")
    return out
