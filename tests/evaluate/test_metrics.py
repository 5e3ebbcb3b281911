"""Metric values against the reference libraries and against cases worked out by hand."""

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from yunque.evaluate import metrics as M

PREDS = ["the cat sat on the mat", "a quick brown fox", "hello there general kenobi", "nothing in common"]
REFS = ["the cat is on the mat", "the quick brown fox jumps", "hello there", "completely different words"]


def test_rouge_by_hand():
    # unigrams: pred {the, cat, sat}, ref {the, cat, ran}: P = R = 2/3; bigrams: "the cat" only: P = R = 1/2.
    r = M.rouge(["the cat sat"], ["the cat ran"])
    assert r["rouge1"] == pytest.approx(100 * 2 / 3)
    assert r["rouge2"] == pytest.approx(50.0)
    assert r["rougeL"] == pytest.approx(100 * 2 / 3)


def test_rouge_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    want = {
        t: 100 * sum(scorer.score(r, p)[t].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
        for t in ("rouge1", "rouge2", "rougeL")
    }
    got = M.rouge(PREDS, REFS)
    assert got == pytest.approx(want)
    assert 0 < got["rouge2"] < got["rouge1"] < 100


def test_rouge_multi_reference_takes_the_best():
    one = M.rouge(["the cat sat"], ["dogs bark loudly"])["rouge1"]
    best = M.rouge(["the cat sat"], [["dogs bark loudly", "the cat sat"]])["rouge1"]
    assert one == 0.0 and best == pytest.approx(100.0)


def test_bleu_and_chrf_match_sacrebleu():
    assert M.bleu(PREDS, REFS) == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert M.chrf(PREDS, REFS) == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    assert M.bleu(REFS, REFS) == pytest.approx(100.0)
    assert 0 < M.bleu(PREDS, REFS) < 100


def test_bleu_with_uneven_reference_counts():
    refs = [["the cat is on the mat", "a cat is on the mat"], ["the quick brown fox jumps"]]
    streams = [["the cat is on the mat", "the quick brown fox jumps"], ["a cat is on the mat", None]]
    want = sacrebleu.corpus_bleu(PREDS[:2], streams).score
    assert M.bleu(PREDS[:2], refs) == pytest.approx(want)


@pytest.mark.parametrize(
    "pred,ref,hit",
    [
        ("The Eiffel Tower!", "eiffel tower", True),  # case, punctuation, article
        ("  Paris ,  France ", "paris france", True),  # whitespace and punctuation
        ("ＡＢＣ", "abc", True),  # NFKC folds full-width letters
        ("an apple", "apple", True),
        ("Paris", "Lyon", False),
        ("theater", "ater", False),  # only whole-word articles are dropped
    ],
)
def test_exact_match_normalisation(pred, ref, hit):
    assert M.exact_match([pred], [ref]) == (100.0 if hit else 0.0)


def test_exact_match_any_reference():
    assert M.exact_match(["blue", "red"], [["Blue.", "navy"], ["green"]]) == 50.0


def test_classification_report_by_hand():
    gold = ["cat", "cat", "cat", "dog", "dog", "bird"]
    pred = ["cat", "cat", "dog", "dog", "cat", M.NO_LABEL]
    r = M.classification_report(pred, gold)
    assert r.labels == ["bird", "cat", "dog"]
    assert r.columns == ["bird", "cat", "dog", M.NO_LABEL]
    assert r.confusion == [[0, 0, 0, 1], [0, 2, 1, 0], [0, 1, 1, 0]]
    assert r.accuracy == pytest.approx(100 * 3 / 6)
    # cat: tp 2, predicted 3, gold 3 -> P = R = F = 2/3.  dog: tp 1, predicted 2, gold 2 -> 1/2.  bird: 0.
    assert r.per_class["cat"]["precision"] == pytest.approx(100 * 2 / 3)
    assert r.per_class["cat"]["recall"] == pytest.approx(100 * 2 / 3)
    assert r.per_class["dog"]["f1"] == pytest.approx(50.0)
    assert r.per_class["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r.macro_f1 == pytest.approx((100 * 2 / 3 + 50.0 + 0.0) / 3)


def test_classification_report_uneven_precision_recall():
    # spam: tp 1, predicted 3, gold 1 -> P 1/3, R 1, F1 = 2 * (1/3) / (4/3) = 1/2.
    r = M.classification_report(["spam", "spam", "spam", "ham"], ["spam", "ham", "ham", "ham"])
    assert r.per_class["spam"]["precision"] == pytest.approx(100 / 3)
    assert r.per_class["spam"]["recall"] == pytest.approx(100.0)
    assert r.per_class["spam"]["f1"] == pytest.approx(50.0)
    assert r.per_class["ham"]["recall"] == pytest.approx(100 / 3)
    assert M.NO_LABEL not in r.columns


@pytest.mark.parametrize(
    "text,label",
    [
        ("positive", "positive"),
        ("Positive. The review praises the film.", "positive"),
        ("I think this is negative overall, not positive", "negative"),  # earliest mention wins
        ("not spam", "not spam"),  # the longer label wins over its prefix
        ("spam, clearly", "spam"),
        ("no idea", M.NO_LABEL),
    ],
)
def test_parse_label(text, label):
    assert M.parse_label(text, ["positive", "negative", "spam", "not spam"]) == label


def test_length_mismatch_and_empty_are_errors():
    with pytest.raises(ValueError):
        M.bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        M.rouge([], [])


def test_bleu_note_for_short_references():
    labels = ["phishing", "benign", "scan", "203.0.113.7, 5", "legitimate"]  # a demo-like test split
    # every answer right, and still BLEU-4 is 0: no reference has a 4-gram
    assert M.exact_match(labels, labels) == 100.0 and M.bleu(labels, labels) == 0.0 and M.chrf(labels, labels) == 100.0
    assert M.median_reference_tokens(labels) == 1.0
    assert M.median_reference_tokens([["a", "b c d e f"], "g h"]) == 3.5  # the longest reference of an example
    note = M.bleu_note(labels)
    assert note and "not meaningful" in note and "chrF" in note
    assert M.bleu_note(REFS) is None  # 4-6 tokens: BLEU-4 has n-grams to count
    assert M.bleu_note([]) is None


def test_eval_report_flags_bleu_on_short_references(tmp_path):
    from yunque.evaluate.report import markdown, metrics_table, write_report
    from yunque.evaluate.runner import EvalResult

    def result(refs):
        preds = [{"source": f"t:{i}", "prediction": r, "references": [r]} for i, r in enumerate(refs)]
        ms = M.text_metrics(["bleu", "chrf", "exact_match"], refs, refs)
        return EvalResult("m", None, "test.jsonl", "generation", len(refs), ms, predictions=preds)

    short = result(["phishing", "benign", "scan"])
    md = markdown([short])
    assert "| BLEU (see note) | 0.00 |" in md and "Note: BLEU-4 is not meaningful here" in md
    data = json.loads((write_report([short], tmp_path / "out") / "eval.json").read_text())
    assert "not meaningful" in data["notes"]["bleu"]
    long = result(REFS)
    assert "note" not in markdown([long]).lower() and "| BLEU | 100.00 |" in metrics_table([long])
