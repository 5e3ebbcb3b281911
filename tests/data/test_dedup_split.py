"""Exact and near deduplication, deterministic leakage-free splits, stratification, oversampling."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from datahelp import all_records, cfg, read_jsonl, sentence, write_jsonl

from yunque.data.dedup import MinHasher, NearDupIndex, shingles
from yunque.data.pipeline import prepare
from yunque.data.split import copies_for, oversample_plan, split_of
from yunque.errors import ConfigError

NO_PII = {"enabled": False}
QUIET = {"log": lambda *_: None}


def _near_copy(text: str, k: int = 1) -> str:
    words = text.split()
    for j in range(k):
        words[5 + 7 * j] = "CHANGED"
    return " ".join(words)


def _where(out) -> dict[str, str]:
    return {r["source"]: s for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")}


def test_minhash_shingle_hashes_match_the_set_definition():
    mh = MinHasher(128, 5)
    for text in ("the quick brown fox jumps over the lazy dog again and again", "短文本", "中文 去重 测试 a b"):
        assert len(mh.shingle_hashes(text)) == len(shingles(text, 5))
    a = sentence(1, 200)
    b = _near_copy(a, 3)
    sa, sb = (np.frombuffer(mh(x), dtype=np.uint32) for x in (a, b))
    true_j = len(shingles(a, 5) & shingles(b, 5)) / len(shingles(a, 5) | shingles(b, 5))
    assert abs((sa == sb).mean() - true_j) < 0.12


def test_near_index_finds_pairs_above_threshold_not_below():
    mh = MinHasher(128, 5)
    idx = NearDupIndex(128, 0.8)
    base = [sentence(i, 120) for i in range(50)]
    for t in base:
        assert idx.matches(mh(t)) == []
        idx.add(mh(t))
    hits = sum(bool(idx.matches(mh(_near_copy(t, 1)))) for t in base)  # J ~ 0.92
    assert hits >= 48
    far = sum(bool(idx.matches(mh(_near_copy(t, 12)))) for t in base)  # J ~ 0.4
    assert far == 0


def test_index_candidates_equal_datasketch_minhashlsh():
    from datasketch import MinHashLSH

    mh = MinHasher(128, 5)
    idx = NearDupIndex(128, 0.8)
    ref = MinHashLSH(num_perm=128, params=(idx.b, idx.r))

    class Sig:  # what MinHashLSH reads of a MinHash
        scheme = "affine32"

        def __init__(self, b: bytes):
            self.hashvalues = np.frombuffer(b, dtype=np.uint32)

        def __len__(self) -> int:
            return 128

    texts = [sentence(i, 60) for i in range(60)]
    texts += [_near_copy(t, k % 7 + 1) for k, t in enumerate(texts[:30])]  # J from ~0.9 down to ~0.5
    hits = 0
    for i, t in enumerate(texts):
        sig = mh(t)
        cands = idx.candidates(idx.bands(sig))
        assert cands == set(ref.query(Sig(sig))), i
        hits += bool(cands)
        idx.add(sig)
        ref.insert(i, Sig(sig))
    assert hits >= 8  # the comparison covered non-empty candidate sets


def test_exact_and_near_duplicates_removed_with_examples(tmp_path):
    rows = [{"text": sentence(i, 80)} for i in range(30)]
    rows += [{"text": "  " + rows[3]["text"] + "\u200b "}]  # exact after cleaning
    rows += [{"text": _near_copy(rows[7]["text"])}]  # near
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    r = prepare([src], tmp_path / "out", cfg(pii=NO_PII), **QUIET)
    assert r.dropped == {"exact_duplicate": 1, "near_duplicate": 1}
    ex = r.report["dedup"]["examples"]
    assert {"kind": "exact", "removed": f"{src}:31", "kept": f"{src}:4"} in ex
    assert any(e["kind"] == "near" and e["removed"] == f"{src}:32" and e["kept"] == f"{src}:8" for e in ex)
    assert r.report["cross_split_overlap"] == {"exact": 0, "near": 0}
    r2 = prepare([src], tmp_path / "out2", cfg(pii=NO_PII, dedup={"near": "off"}), **QUIET)
    assert r2.dropped == {"exact_duplicate": 1}


def test_near_duplicate_clusters_stay_in_one_split(tmp_path):
    rows = []
    for i in range(40):  # 40 clusters of 4 near-identical members
        base = sentence(i, 100)
        rows += [{"text": base}] + [{"text": _near_copy(base, k)} for k in (1, 2, 3)]
    src = write_jsonl(tmp_path / "g.jsonl", rows)
    r = prepare([src], tmp_path / "out", cfg(pii=NO_PII, dedup={"near": "group"}), **QUIET)
    where = _where(tmp_path / "out")
    kept_clusters: dict[int, set[str]] = {}
    for source, split in where.items():
        line = int(source.rsplit(":", 1)[1])
        kept_clusters.setdefault((line - 1) // 4, set()).add(split)
    assert all(len(s) == 1 for s in kept_clusters.values())
    assert len({next(iter(s)) for s in kept_clusters.values()}) == 3  # clusters do spread over all splits
    assert r.records_kept + r.dropped.get("near_duplicate_bridge", 0) == 160
    assert r.report["cross_split_overlap"] == {"exact": 0, "near": 0}


def test_split_is_deterministic_and_stable_when_adding_records(tmp_path):
    rows = [{"text": sentence(i)} for i in range(300)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows + [{"text": sentence(i)} for i in range(1000, 1200)])
    r1 = prepare([a], tmp_path / "o1", cfg(pii=NO_PII), **QUIET)
    r1b = prepare([a], tmp_path / "o1b", cfg(pii=NO_PII, workers=2), **QUIET)
    m1, m1b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("o1", "o1b"))
    assert {s: v["merkle_root"] for s, v in m1["splits"].items()} == {
        s: v["merkle_root"] for s, v in m1b["splits"].items()
    }
    assert r1.manifest_sha256 != r1b.manifest_sha256  # only the recorded `workers` setting differs
    prepare([b], tmp_path / "o2", cfg(pii=NO_PII), **QUIET)
    w1 = {r["text"]: s for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "o1" / f"{s}.jsonl")}
    w2 = {r["text"]: s for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "o2" / f"{s}.jsonl")}
    assert all(w2[t] == s for t, s in w1.items())
    counts = Counter(w2.values())
    assert 0.72 < counts["train"] / 500 < 0.88 and counts["val"] > 25 and counts["test"] > 25
    r3 = prepare([a], tmp_path / "o3", cfg(pii=NO_PII, split={"seed": 1}), **QUIET)
    assert r3.report["splits"] != r1.report["splits"] or _where(tmp_path / "o3") != _where(tmp_path / "o1")


def test_split_of_ratios():
    counts = Counter(split_of(i.to_bytes(4, "little"), 3, (0.7, 0.2, 0.1)) for i in range(20000))
    assert abs(counts[0] / 20000 - 0.7) < 0.015 and abs(counts[1] / 20000 - 0.2) < 0.015
    assert Counter(split_of(i.to_bytes(4, "little"), 0, (1, 0, 0)) for i in range(100)) == {0: 100}


def test_stratified_classification_and_oversampling_only_in_train(tmp_path):
    rows = [{"text": sentence(i, 20), "label": "spam" if i % 10 == 0 else "ham"} for i in range(2000)]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    r = prepare(
        [src],
        tmp_path / "out",
        cfg(pii=NO_PII, dedup={"near": "off"}, split={"oversample_ratio": 0.5, "stratify": True}),
        **QUIET,
    )
    sp = r.report["splits"]
    for s in ("train", "val", "test"):
        labels = sp[s]["labels"]
        assert abs(labels["spam"] / (labels["spam"] + labels["ham"]) - 0.1) < 0.01, (s, labels)
    before, after = sp["train"]["labels"], sp["train"]["labels_after_oversampling"]
    assert after["ham"] == before["ham"] and after["spam"] == -(-before["ham"] // 2)
    assert sp["val"]["labels_after_oversampling"] == sp["val"]["labels"]
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    copies = [x for x in train if x.get("oversampled")]
    assert len(copies) == after["spam"] - before["spam"] == r.report["oversampled_copies"]
    assert all(x["label"] == "spam" for x in copies)
    for s in ("val", "test"):
        assert not any(x.get("oversampled") for x in read_jsonl(tmp_path / "out" / f"{s}.jsonl"))
    assert r.splits["train"] == len(train) and r.report["cross_split_overlap"]["exact"] == 0
    originals = {x["source"] for x in train if not x.get("oversampled")}
    assert {x["source"] for x in copies} <= originals  # copies are of training records only


def test_stratification_is_exact_and_stable_under_appending(tmp_path):
    rows = [{"text": sentence(i, 12), "label": ["a", "b", "c", "d"][min(3, i % 20)]} for i in range(400)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows + [{"text": sentence(i, 12), "label": "c"} for i in range(1000, 1100)])
    exact = {"stratify": True}
    r = prepare([a], tmp_path / "o1", cfg(pii=NO_PII, dedup={"near": "off"}, split=exact), **QUIET)
    for lab, n in Counter(x["label"] for x in rows).items():
        for s, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
            assert abs(r.report["splits"][s]["labels"].get(lab, 0) - share * n) <= 1.5, (lab, s)
    prepare([a, b], tmp_path / "o2", cfg(pii=NO_PII, dedup={"near": "off"}, split=exact), **QUIET)
    w1 = {r["text"]: s for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "o1" / f"{s}.jsonl")}
    w2 = {r["text"]: s for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "o2" / f"{s}.jsonl")}
    assert all(w2[t] == s for t, s in w1.items())


def test_default_split_is_stable_under_any_insertion_and_stratified_in_expectation(tmp_path):
    rows = [{"text": sentence(i, 12), "label": ["a", "b"][i % 2]} for i in range(3000)]
    extra = [{"text": sentence(i, 12), "label": "b"} for i in range(5000, 5600)]
    before = write_jsonl(tmp_path / "a.jsonl", rows)
    mixed = write_jsonl(tmp_path / "b.jsonl", extra[:300] + rows[:1500] + extra[300:] + rows[1500:])
    r = prepare([before], tmp_path / "o1", cfg(pii=NO_PII, dedup={"near": "off"}), **QUIET)
    for lab in ("a", "b"):  # 1500 per label: the shares hold to binomial noise (sd ~1.2 points at 10%)
        for s, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
            assert abs(r.report["splits"][s]["labels"][lab] / 1500 - share) < 0.04, (lab, s)
    prepare([mixed], tmp_path / "o2", cfg(pii=NO_PII, dedup={"near": "off"}), **QUIET)
    w1 = {r["text"]: s for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "o1" / f"{s}.jsonl")}
    w2 = {r["text"]: s for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "o2" / f"{s}.jsonl")}
    assert len(w1) == 3000 and len(w2) == 3600 and all(w2[t] == s for t, s in w1.items())


def test_exact_duplicates_kept_follow_their_first_copy(tmp_path):
    rows = [{"text": sentence(i % 40, 12), "label": str(i % 3)} for i in range(200)]
    src = write_jsonl(tmp_path / "x.jsonl", rows)
    r = prepare([src], tmp_path / "o", cfg(pii=NO_PII, dedup={"exact": False, "near": "off"}), **QUIET)
    assert r.records_kept == 200 and r.report["cross_split_overlap"]["exact"] == 0
    plain = write_jsonl(tmp_path / "p.jsonl", [{"text": x["text"]} for x in rows])  # hash split, no labels
    prepare([plain], tmp_path / "p", cfg(pii=NO_PII, dedup={"exact": False, "near": "off"}), **QUIET)
    for out in ("o", "p"):
        where: dict[str, set] = {}
        for s in ("train", "val", "test"):
            for x in read_jsonl(tmp_path / out / f"{s}.jsonl"):
                where.setdefault(x["text"], set()).add(s)
        assert len(where) == 40 and all(len(v) == 1 for v in where.values())


def test_oversample_plan():
    assert oversample_plan({"a": 100, "b": 10, "c": 60}, 0.5) == {"b": 40}
    assert oversample_plan({"a": 100, "b": 10}, 1.0) == {"b": 90}
    assert sum(copies_for(j, 10, 25) for j in range(10)) == 25


def test_counts_reconcile_and_report_files(tmp_path):
    rows = [{"text": sentence(i)} for i in range(50)] + [{"text": sentence(1)}, {"nope": 1}]
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    r = prepare([src], tmp_path / "out", cfg(pii=NO_PII), **QUIET)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["records_in"] == 52 == rep["records_kept"] + rep["records_dropped"]
    assert rep["records_dropped"] == sum(rep["dropped_by_reason"].values())
    assert (
        sum(v["unique_records"] for v in rep["splits"].values())
        == rep["records_kept"]
        == len(all_records(tmp_path / "out"))
    )
    assert (tmp_path / "out" / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Records in: **52**" in (tmp_path / "out" / "report.md").read_text()
    assert r.records_in == 52


def _triage(i: int, verdict: str, **extra) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": f"Alert {i}: {sentence(i, 12)}"},
            {"role": "assistant", "content": verdict},
        ],
        **extra,
    }


@pytest.mark.parametrize(
    "label_from, row",
    [
        ("answer", lambda i, v: _triage(i, v)),  # the answer is the class
        ("label", lambda i, v: _triage(i, f"The verdict is {v}.", label=v)),  # a label field beside the messages
    ],
)
def test_oversampling_chat_records(tmp_path, label_from, row):
    rows = [row(i, "malicious" if i % 10 == 0 else "benign") for i in range(600)]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    split = {"oversample_ratio": 0.5} | (
        {"label_from": label_from} if label_from != "label" else {}
    )  # "label": the default
    r = prepare([src], tmp_path / "out", cfg(pii=NO_PII, dedup={"near": "off"}, split=split), **QUIET)
    before, after = r.report["splits"]["train"]["labels"], r.report["splits"]["train"]["labels_after_oversampling"]
    assert after["malicious"] == -(-before["benign"] // 2) > before["malicious"] and after["benign"] == before["benign"]
    copies = [x for x in read_jsonl(tmp_path / "out" / "train.jsonl") if x.get("oversampled")]
    assert len(copies) == after["malicious"] - before["malicious"] == r.report["oversampled_copies"] > 0
    assert all("malicious" in x["messages"][-1]["content"] for x in copies)


def test_oversampling_without_labels_says_why(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [_triage(i, "benign" if i % 3 else "malicious") for i in range(60)])
    with pytest.raises(
        ConfigError,
        match=r"split.oversample_ratio: no record has a label to balance \(input shapes: chat\)"
        r".*split.label_from: answer",
    ):
        prepare([src], tmp_path / "out", cfg(pii=NO_PII, split={"oversample_ratio": 0.5}), **QUIET)
    assert not (tmp_path / "out").exists()
