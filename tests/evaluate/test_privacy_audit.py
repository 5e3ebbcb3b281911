"""`yunque privacy-audit`: the attack statistics are right on known scores, and the audit of a tiny model
runs end to end with numbers in range (a model as its own reference gives a chance-level calibrated attack)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from train_util import TINY_MODEL, make_corpus, one_thread

from yunque.evaluate.privacy_audit import attack, auc, roc, run_audit, tpr_at_fpr, write_audit

_one_thread = pytest.fixture(autouse=True)(one_thread)


def test_auc_and_tpr_on_known_scores():
    pos, neg = np.arange(10.0, 20.0), np.arange(0.0, 10.0)
    assert auc(pos, neg) == 1.0 and auc(neg, pos) == 0.0
    assert auc(np.ones(5), np.ones(7)) == 0.5  # ties count half
    assert auc(np.array([1.0, 3.0]), np.array([2.0, 0.0])) == 0.75
    neg = np.arange(200.0)  # 1% FPR allows 2 false positives: threshold at the third highest, 197
    assert tpr_at_fpr(np.array([198.0, 197.0, 500.0, 0.0]), neg) == 0.5
    fpr, tpr = roc(np.array([3.0, 1.0]), np.array([2.0, 0.0]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_bootstrap_interval_covers_chance_for_one_distribution():
    rng = np.random.default_rng(0)
    r = attack(rng.normal(size=300), rng.normal(size=300), resamples=300)
    lo, hi = r["auc_ci95"]
    assert lo < 0.5 < hi and lo <= r["auc"] <= hi and hi - lo < 0.2
    assert 0 <= r["tpr_at_1pct_fpr_ci95"][0] <= r["tpr_at_1pct_fpr_ci95"][1] <= 1
    sep = attack(rng.normal(3, 1, 300), rng.normal(size=300), resamples=300)
    assert sep["auc"] > 0.95 and sep["auc_ci95"][0] > 0.9 and sep["tpr_at_1pct_fpr"] > 0.3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from yunque.data.canary import append_canary, make_canaries, save_canaries
    from yunque.formats.hf import save_model
    from yunque.model import ModelConfig, Transformer
    from yunque.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("audit")
    corpus = make_corpus(d / "corpus")
    tok = Tokenizer.from_dir(corpus["tok"])
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, max_position_embeddings=256, **TINY_MODEL))
    m.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(m, d / "model")
    tok.save(d / "model")
    recs = [json.loads(x) for x in corpus["sft"].read_text().splitlines()]
    data = d / "data"
    data.mkdir()
    canaries = make_canaries(2, seed=1)
    train, test = recs[:160], recs[160:]
    for i, c in enumerate(canaries):
        append_canary(train[i], c.text)
    save_canaries(canaries, data / "canaries.json")
    for name, rs in (("train", train), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return d / "model", data


def test_audit_of_a_tiny_model_is_in_range(setup, tmp_path):
    model, data = setup
    r = run_audit(model, data, reference=model, max_records=40, resamples=200, batch_size=64)
    assert r["members"] == r["nonmembers"] == 40 and r["nonmember_split"] == "test"
    for key in ("loss_attack", "calibrated_attack"):
        a = r[key]
        assert 0 <= a["auc_ci95"][0] <= a["auc"] <= a["auc_ci95"][1] <= 1
        assert 0 <= a["tpr_at_1pct_fpr"] <= 1
        assert a["roc"]["fpr"][0] == 0 and a["roc"]["tpr"][-1] == 1
    # the model is its own reference: every calibrated score is 0, the attack is a coin toss
    assert r["calibrated_attack"]["auc"] == 0.5
    e = r["exposure"]
    assert len(e["canaries"]) == 2 and e["max_bits"] == pytest.approx(math.log2(1000))
    for c in e["canaries"]:
        assert 0 <= c["exposure"] <= e["max_bits"] and c["exposure"] == c["reference_exposure"]
    assert 0 < r["loss"]["members_mean"] < 2 * math.log(320)  # a random model: about log(vocab)
    files = write_audit(r, tmp_path / "out")
    assert [f.name for f in files] == ["audit.json", "audit.md", "audit.png"]
    md = (tmp_path / "out" / "audit.md").read_text()
    assert "| loss threshold |" in md and "| **mean** |" in md


def test_exposure_sees_a_memorised_canary(setup):
    """A model that was trained on the canary's text (here: fitted on it for a few hundred steps) ranks
    its secret first: the exposure is the maximum, against ~chance for the untouched reference."""
    from yunque.data.canary import load_canaries
    from yunque.evaluate.canary import canary_exposure
    from yunque.formats.hf import load_model
    from yunque.tokenizer import Tokenizer

    model, data = setup
    tok = Tokenizer.from_dir(model)
    c = load_canaries(data / "canaries.json")[0]
    m = load_model(model)
    ids = torch.tensor([[tok.bos_id, *tok.encode(c.text)]])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1])[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    (hit,) = canary_exposure(m, tok, [c], candidates=1000, batch_size=250)
    (base,) = canary_exposure(load_model(model), tok, [c], candidates=1000, batch_size=250)
    assert hit == pytest.approx(math.log2(1000)) and base < 8


def test_cli_refuses_too_few_candidates(setup, tmp_path, capsys):
    from yunque.__main__ import main

    model, data = setup
    argv = ["privacy-audit", "--model", str(model), "--data", str(data), "--out", str(tmp_path), "--candidates", "99"]
    rc = main(argv)
    assert rc == 2 and "at least 1000" in capsys.readouterr().err
