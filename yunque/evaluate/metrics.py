"""Text and classification metrics over predictions and references.

Overlap metrics come from the reference libraries, never re-implemented: ROUGE-1/2/L from
`rouge-score` (F-measure, Porter stemming, best over the example's references), corpus BLEU
and chrF from `sacrebleu` (default 13a tokenisation; chrF with character n-grams up to 6).
All scores are percentages (0-100) so one table can hold them side by side.

Exact match compares normalised strings. The normalisation (SQuAD's, plus Unicode NFKC):
NFKC, lowercase, drop punctuation (Unicode category P*), drop the articles "a", "an", "the",
collapse whitespace. A prediction matches when it equals any normalised reference.

Classification: the generated text is mapped to a label with `parse_label` (below); a
prediction that names no label is counted as the pseudo-label `<none>`, which is always wrong
and shows up as its own column of the confusion matrix.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

NO_LABEL = "<none>"
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _refs(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def normalize_answer(text: str) -> str:
    """NFKC, lowercase, no punctuation, no articles, single spaces (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    refs = _refs(references)
    _check_lengths(predictions, refs)
    hits = sum(normalize_answer(p) in {normalize_answer(r) for r in rs} for p, rs in zip(predictions, refs))
    return 100.0 * hits / len(predictions)


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
) -> dict[str, float]:
    """Mean ROUGE F-measure per type, each example scored against its best-matching reference.

    rouge-score tokenises on [a-z0-9]+ only: text without Latin letters or digits scores 0."""
    from rouge_score import rouge_scorer

    refs = _refs(references)
    _check_lengths(predictions, refs)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = {t: 0.0 for t in types}
    for p, rs in zip(predictions, refs):
        scores = scorer.score_multi(rs, p)  # max F-measure over the references
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: 100.0 * v / len(predictions) for t, v in totals.items()}


def _ref_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference index; None fills examples with fewer references."""
    n = max(len(r) for r in refs)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(n)]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    from sacrebleu.metrics import BLEU

    refs = _refs(references)
    _check_lengths(predictions, refs)
    return float(BLEU().corpus_score(list(predictions), _ref_streams(refs)).score)


BLEU_ORDER = 4  # sacrebleu's default max n-gram order: BLEU-4


def median_reference_tokens(references: Sequence[str | Sequence[str]]) -> float:
    """The median over examples of the longest reference's length in BLEU's own (13a) tokens."""
    from statistics import median

    from sacrebleu.metrics import BLEU

    tokenize = BLEU().tokenizer
    return float(median(max(len(tokenize(r).split()) for r in rs) for rs in _refs(references)))


def bleu_note(references: Sequence[str | Sequence[str]]) -> str | None:
    """Why BLEU says nothing about these references, or None when it does.

    BLEU-4 is a geometric mean over 1- to 4-gram precisions: an example whose reference has fewer
    than four tokens has no 4-gram to match, so with mostly short references (labels, one-word
    answers) it is 0 or near it even when every answer is right."""
    if not references:
        return None
    n = median_reference_tokens(references)
    if n >= BLEU_ORDER:
        return None
    return (
        f"BLEU-{BLEU_ORDER} is not meaningful here: the median reference is {n:g} token{'s' if n != 1 else ''} "
        f"long, shorter than BLEU's {BLEU_ORDER}-grams, so it is near 0 even for right answers; "
        "read exact match and chrF (character n-grams) instead."
    )


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    from sacrebleu.metrics import CHRF

    refs = _refs(references)
    _check_lengths(predictions, refs)
    return float(CHRF().corpus_score(list(predictions), _ref_streams(refs)).score)


def _check_lengths(predictions: Sequence, refs: Sequence) -> None:
    if len(predictions) != len(refs):
        raise ValueError(f"{len(predictions)} predictions but {len(refs)} references")
    if not predictions:
        raise ValueError("no predictions to score")


# -- classification ------------------------------------------------------------------------------
def parse_label(text: str, labels: Sequence[str]) -> str:
    """The label a generated text names.

    Rules, in order, on normalised text: the whole output equals a label; the output starts
    with a label (longest label first, so "not spam" wins over "not"); the label whose first
    whole-word occurrence comes earliest. Otherwise `<none>`."""
    out = normalize_answer(text)
    norm = {label: normalize_answer(label) for label in labels}
    for label, n in norm.items():
        if out == n:
            return label
    for label, n in sorted(norm.items(), key=lambda kv: -len(kv[1])):
        if n and (out == n or out.startswith(n + " ")):
            return label
    best, best_pos = NO_LABEL, None
    for label, n in sorted(norm.items(), key=lambda kv: -len(kv[1])):
        m = re.search(rf"(?<!\w){re.escape(n)}(?!\w)", out) if n else None
        if m and (best_pos is None or m.start() < best_pos):
            best, best_pos = label, m.start()
    return best


@dataclass
class ClassReport:
    labels: list[str]  # gold labels, sorted; NO_LABEL is appended to `columns` when predicted
    accuracy: float  # percent
    macro_f1: float  # percent, mean over `labels`
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1 (percent), support
    columns: list[str]  # confusion-matrix columns (predicted labels)
    confusion: list[list[int]]  # rows: gold `labels`, columns: `columns`
    extra: dict = field(default_factory=dict)


def classification_report(
    predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str] | None = None
) -> ClassReport:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix.

    A class never predicted has precision 0 (not undefined) and a class with no gold examples
    has recall 0, as scikit-learn's `zero_division=0` does."""
    _check_lengths(predicted, gold)
    labels = sorted(set(labels or []) | set(gold))
    columns = labels + ([NO_LABEL] if any(p not in labels for p in predicted) else [])
    col = {c: i for i, c in enumerate(columns)}
    confusion = [[0] * len(columns) for _ in labels]
    for p, g in zip(predicted, gold):
        confusion[labels.index(g)][col[p if p in col else NO_LABEL]] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        pred_n = sum(row[i] for row in confusion)
        gold_n = sum(confusion[i])
        p = tp / pred_n if pred_n else 0.0
        r = tp / gold_n if gold_n else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_class[label] = {"precision": 100 * p, "recall": 100 * r, "f1": 100 * f, "support": gold_n}
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return ClassReport(
        labels=labels,
        accuracy=100.0 * correct / len(gold),
        macro_f1=sum(v["f1"] for v in per_class.values()) / len(labels),
        per_class=per_class,
        columns=columns,
        confusion=confusion,
    )


# name -> what it needs; the runner checks requested names against this table.
GENERATION_METRICS = ("rouge", "bleu", "chrf", "exact_match")
ALL_METRICS = ("perplexity", *GENERATION_METRICS, "classification")


def text_metrics(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        if name == "rouge":
            out.update(rouge(predictions, references))
        elif name == "bleu":
            out["bleu"] = bleu(predictions, references)
        elif name == "chrf":
            out["chrf"] = chrf(predictions, references)
        elif name == "exact_match":
            out["exact_match"] = exact_match(predictions, references)
    return out
