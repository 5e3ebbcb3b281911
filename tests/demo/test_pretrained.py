"""The default demo on a real pretrained model: its pieces fast, and the whole quick run end to end (slow;
skipped where the model package is not installed)."""

from __future__ import annotations

import json

import pytest

from yunque.demo import domain, pretrained, pretrained_report, scoring
from yunque.errors import YunqueError
from yunque.models import CATALOGUE, locate

SMOL = CATALOGUE[pretrained.MODEL]


def _chat(task: str, user: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": domain.SYSTEM[task]},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def test_first_label_scoring_reads_a_sentence_but_exact_does_not():
    ok = scoring.answer_correct
    assert ok("auth_triage", "This log shows a brute-force attack, not a scan.", "brute-force", "first_label")
    assert not ok("auth_triage", "This log shows a brute-force attack, not a scan.", "brute-force", "exact")
    assert ok("alert_tactic", "Credential Access (dumping LSASS)", "credential-access", "first_label")
    # The first label named is the answer, even when the sentence goes on to name the right one.
    assert not ok("phishing", "Not phishing: it is legitimate.", "legitimate", "first_label")
    assert not ok("phishing", "I cannot tell.", "phishing", "first_label")
    recs = [_chat("phishing", "m", "phishing"), _chat("auth_triage", "l", "scan")]
    s = scoring.task_scores(recs, ["Phishing!", "a port scan"], "first_label")
    assert s["all"]["accuracy"] == 100.0 and scoring.task_scores(recs, ["Phishing!", "a port scan"])["all"]["n"] == 2
    assert scoring.task_scores(recs, ["Phishing!", "a port scan"])["all"]["correct"] == 0


def test_first_per_task_keeps_file_order():
    recs = [_chat(t, str(i), "x") for i, t in enumerate(["phishing", "phishing", "auth_triage", "phishing"])]
    picked = pretrained.first_per_task(recs, 2)
    assert [r["messages"][1]["content"] for r in picked] == ["0", "1", "2"]
    assert pretrained.first_per_task(recs, None) == recs
    text = {"kind": "text", "text": "replay"}  # replay text that `data prepare` split into the test split too
    assert pretrained.first_per_task([text, *recs], None) == recs


def test_forgetting_bar_and_verdict():
    assert pretrained.forgetting({"perplexity": 10.0}, {"perplexity": 10.99})["ok"]
    f = pretrained.forgetting({"perplexity": 10.0}, {"perplexity": 11.01})
    assert not f["ok"] and f["rise_pct"] == pytest.approx(10.1)
    tasks = {"all": {"accuracy": 92.0}, "phishing": {"accuracy": 100.0}, "auth_triage": {"accuracy": 79.0}}
    facts = {
        "plan": {"accuracy_bar": 90.0, "task_bar": 80.0},
        "eval": {"fine-tuned": {"tasks": tasks}},
        "forgetting": {"ok": True},
    }
    v = pretrained.verdict(facts)
    assert not v["ok"] and v["accuracy_ok"] and v["tasks_below_bar"] == ["auth_triage"]
    tasks["auth_triage"]["accuracy"] = 80.0
    assert pretrained.verdict(facts)["ok"]
    facts["forgetting"]["ok"] = False
    assert not pretrained.verdict(facts)["ok"]


def test_general_english_text_is_not_about_the_tasks():
    texts = pretrained.general_texts()
    assert len(texts) >= 10 and sum(map(len, texts)) > 8000
    words = {"phishing", "brute", "attack", "alert", "log", "password", "malware", "security"}
    assert not [w for t in texts for w in words if f" {w}" in t.lower()]


def test_reduced_redteam_suite():
    suite = pretrained.redteam_suite(1)
    names = [c.name for c in suite.categories]
    assert "unbounded_consumption" not in names and "direct_prompt_injection" in names
    assert {c.kind for c in suite.categories} == {"attack", "harmful", "benign"}
    assert all(len(p.variants) == 1 for c in suite.categories for p in c.probes)
    assert sum(len(p.variants) for c in pretrained.redteam_suite(2).categories for p in c.probes) > sum(
        len(p.variants) for c in suite.categories for p in c.probes
    )


def test_missing_model_says_how_to_install(monkeypatch, capsys, tmp_path):
    import yunque.models

    monkeypatch.setattr(yunque.models, "locate", lambda m: None)
    with pytest.raises(YunqueError) as e:
        pretrained.resolve_base(print)
    assert SMOL.install in str(e.value) and "--from-scratch" in str(e.value)
    from yunque.__main__ import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert SMOL.install in err and "Traceback" not in err


def test_cli_keeps_the_from_scratch_demo(capsys):
    from yunque.__main__ import main

    assert main(["demo", "--help"]) == 0
    assert "--from-scratch" in capsys.readouterr().out


def test_report_tables():
    def model(acc, ppl=None):
        tasks = {"all": {"n": 6, "correct": 3, "accuracy": acc}}
        tasks |= {t: {"n": 2, "correct": 1, "accuracy": acc} for t in domain.TASKS}
        return {"tasks": tasks, "metrics": {"exact_match": acc, **({"perplexity": ppl} if ppl else {})}}

    ev = {"base": model(40.0, 9.0), "fine-tuned": model(95.0, 1.1), "int8": model(93.0)}
    rows = pretrained_report.result_rows(ev, {"base": {"perplexity": 20.0}, "fine-tuned": {"perplexity": 21.0}})
    assert rows[0] == ("task accuracy (all)", "", "40.0%", "95.0%", "93.0%")
    assert ("  phishing (n=2)", "50.0%", "40.0%", "95.0%", "93.0%") in rows
    assert rows[-1] == ("general-English perplexity", "", "20.00", "21.00", "–")
    assert ("answer perplexity", "", "9.00", "1.10", "–") in rows

    def cat(kind, k, n):
        c = {"title": kind.title(), "kind": kind, "attempts": n, "refusals": k, "successes": k}
        return c | ({"over_refusal": k / n} if kind == "benign" else {"asr": k / n})

    rt = {
        name: {
            "categories": {"a": cat("attack", k, 4), "b": cat("benign", 0, 2)},
            "overall": {"asr": k / 4, "successes": k, "attack_attempts": 4},
        }
        for name, k in (("base", 1), ("fine-tuned", 2))
    }
    rows = pretrained_report.redteam_rows(rt)
    assert rows[0] == ("Attack", "attack", "attack success", "25.0% (1/4)", "50.0% (2/4)")
    assert rows[1][2:] == ("over-refusal", "0.0% (0/2)", "0.0% (0/2)")
    assert rows[-1][0] == "all attacks"


def _privacy_facts(**over) -> dict:
    dp = {
        "epsilon": 7.9812,
        "delta": 0.00229,
        "noise_multiplier": 0.6134,
        "sample_rate": 8 / 248,
        "expected_batch_size": 8,
        "max_grad_norm": 1.0,
        "steps": 30,
        "accountant": "prv",
        "records": 248,
        "per_sample_gradients": "hooks",
        "record_lengths": {"max": 231},  # in the trainer's report, not needed in the demo's
    }
    audit = {
        "candidates": 1000,
        "members": 80,
        "nonmembers": 80,
        "loss_attack": {"auc": 0.5123, "auc_ci95": (0.4467, 0.5741), "tpr_at_1pct_fpr": 0.0125},
        "calibrated_attack": {"auc": 0.5349, "auc_ci95": (0.46, 0.61)},
        "exposure": {"mean": 1.312, "reference_mean": 1.08, "max_bits": 9.9658},
    }
    for k, v in over.items():
        (audit if k in audit else dp)[k] = v
    return pretrained.privacy_facts(dp, audit, {"requested": 4, "planted": 4, "records": 4}, 8.0)


def test_privacy_line_from_facts():
    p = _privacy_facts()
    assert p["canaries"] == 4 and p["mia_auc_ci95"] == [0.4467, 0.5741] and "record_lengths" not in p
    assert pretrained_report.privacy_line(p) == (
        "privacy: DP-SGD ε = 7.98 (δ = 2.3e-3, σ = 0.61, PRV) · canary exposure 1.3 bits (base 1.1; "
        "10 = memorised) · membership-inference AUC 0.51 [0.45, 0.57] (base-calibrated 0.53)"
    )
    line = pretrained_report.privacy_line(_privacy_facts(exposure=None, delta=1e-5))
    assert "δ = 1.0e-5" in line and "no canary planted" in line and "\n" not in line


def test_verdict_under_privacy_enforces_forgetting_not_accuracy():
    tasks = {"all": {"accuracy": 20.0}, "phishing": {"accuracy": 50.0}, "auth_triage": {"accuracy": 0.0}}
    facts = {
        "plan": {"accuracy_bar": 25.0, "task_bar": 10.0},
        "eval": {"fine-tuned": {"tasks": tasks}},
        "forgetting": {"ok": True, "bar_pct": 10.0},
    }
    v = pretrained.verdict(facts)
    assert not v["ok"] and v["accuracy_enforced"]
    facts["privacy"] = _privacy_facts()
    facts["verdict"] = v = pretrained.verdict(facts)
    assert v["ok"] and not v["accuracy_ok"] and v["tasks_below_bar"] == ["auth_triage"] and not v["accuracy_enforced"]
    text = pretrained_report.bars_text(facts)
    assert "accuracy 25% overall, 10% per task: not met (overall accuracy, auth_triage accuracy)" in text
    assert "not enforced under DP-SGD" in text and text.endswith("up at most 10%: met")
    facts["forgetting"]["ok"] = False
    facts["verdict"] = pretrained.verdict(facts)
    assert not facts["verdict"]["ok"] and pretrained_report.bars_text(facts).endswith("NOT met")


def test_finetune_config_under_privacy(tmp_path):
    from dataclasses import replace

    import torch
    from train_util import TINY_MODEL

    from yunque.lora import apply_lora
    from yunque.model import ModelConfig, Transformer
    from yunque.train.privacy import HookGrads

    plan = pretrained.QUICK
    plain = pretrained.finetune_config(plan, tmp_path / "base", tmp_path, 0)
    dp = pretrained.finetune_config(plan, tmp_path / "base", tmp_path, 0, epsilon=3.0)
    assert not plain.privacy.enabled and plain.lora.dropout == pretrained.LORA["dropout"] > 0
    assert plain.micro_batch == plan.micro_batch and plain.eval.max_batches == plan.val_batches
    p = dp.privacy
    assert (p.target_epsilon, p.max_grad_norm, p.accountant, p.delta, p.seed) == (3.0, 1.0, "prv", "auto", 0)
    assert dp.lora.dropout == 0 and dp.lora.target_modules == pretrained.LORA_TARGETS and dp.method == "lora"
    assert dp.max_steps == plan.steps and dp.optim.lr == plan.lr and dp.data.seq_len == plan.seq_len
    # The expected batch is the records a packed step holds: 2 rows of 512 tokens, records of ~135 tokens.
    assert dp.micro_batch * dp.grad_accum == pretrained.dp_batch(plan)
    assert pretrained.dp_batch(replace(plan, micro_batch=2, seq_len=512)) == 8
    assert pretrained.dp_batch(replace(plan, micro_batch=4, seq_len=512)) == 15
    if plan.val_batches:  # validation as many rows as without DP, rounded up to whole micro-batches
        rows = dp.eval.max_batches * dp.micro_batch
        assert plan.val_batches * plan.micro_batch <= rows < plan.val_batches * plan.micro_batch + dp.micro_batch

    def hooks_refuse(cfg):  # privacy.per_sample auto takes the hooks where this is None
        m = Transformer(ModelConfig(vocab_size=96, max_position_embeddings=64, **TINY_MODEL))
        apply_lora(m, cfg.lora, generator=torch.Generator().manual_seed(0))
        return HookGrads.unsupported(m)

    assert hooks_refuse(dp) is None and "dropout" in hooks_refuse(plain)
    assert pretrained.data_config(plan, 0).canaries.count == 0
    c = pretrained.data_config(plan, 5, canaries=pretrained.DP_CANARIES).canaries
    assert (c.count, c.seed) == (pretrained.DP_CANARIES, 5) and c.count > 0


def test_cli_privacy_flags(monkeypatch, capsys, tmp_path):
    from yunque.__main__ import main
    from yunque.demo.result import DemoResult

    assert main(["demo", "--help"]) == 0
    help_ = " ".join(capsys.readouterr().out.split())
    assert "--privacy" in help_ and "--epsilon EPSILON" in help_ and "(default 8)" in help_
    assert "reported but not enforced" in help_
    for argv, msg in (
        (["--epsilon", "3"], "--epsilon: applies with --privacy"),
        (["--privacy", "--epsilon", "0"], "--epsilon: must be a number > 0"),
        (["--privacy", "--from-scratch"], "--privacy: applies to the pretrained demo"),
    ):
        assert main(["demo", *argv, "--out", str(tmp_path / "d")]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()

    calls = []

    def fake(out, quick=False, seed=0, log=print, epsilon=None):
        calls.append((quick, epsilon))
        r = DemoResult(out, 1.0)
        r.facts["verdict"] = {"ok": epsilon is not None}
        return r

    monkeypatch.setattr(pretrained, "run_pretrained_demo", fake)
    assert main(["demo", "--quick", "--privacy", "--out", str(tmp_path / "d")]) == 0
    assert main(["demo", "--privacy", "--epsilon", "2.5", "--out", str(tmp_path / "d")]) == 0
    assert main(["demo", "--out", str(tmp_path / "d")]) == 1
    assert calls == [(True, pretrained.DP_EPSILON), (False, 2.5), (False, None)] and pretrained.DP_EPSILON == 8.0


@pytest.mark.slow
@pytest.mark.skipif(locate(SMOL) is None, reason=f"{SMOL.name} is not installed: {SMOL.install} (bash install.sh does)")
def test_quick_pretrained_demo_end_to_end(tmp_path):
    pytest.importorskip("gguf", reason="the model is converted from GGUF: pip install gguf (yunque[gguf])")
    lines: list[str] = []
    r = pretrained.run_pretrained_demo(tmp_path / "demo", quick=True, seed=0, log=lines.append)
    out = r.out_dir
    for rel in (
        "report.md",
        "run.json",
        "accuracy.png",
        "finetune_loss.png",
        "model/config.json",
        "ship/int8/config.json",
        "ship/model.q8_0.gguf",
        "finetune/adapter/adapter_config.json",
        "data/manifest.json",
        "eval/base.jsonl",
        "eval/fine-tuned.jsonl",
        "eval/int8.jsonl",
        "redteam/base/redteam.json",
        "redteam/fine-tuned/redteam.json",
    ):
        assert (out / rel).is_file(), rel
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["source_sha256"] == SMOL.sha256 and run["cpu"]["capability"]
    assert set(run["prepare"]["merkle_roots"]) == {"train", "val", "test"}
    assert run["prepare"]["pii_findings"].get("EMAIL", 0) > 0 and run["prepare"]["dropped"].get("exact_duplicate", 0)
    assert len(run["files_sha256"]["model/model.safetensors"]) == 64 and "ship/int8/config.json" in run["files_sha256"]
    assert run["ship"]["gguf"]["sha256"] == run["files_sha256"]["ship/model.q8_0.gguf"]
    ev = run["eval"]
    n = pretrained.QUICK.test_per_task
    assert all(ev[m]["tasks"][t]["n"] == n for m in ("base", "fine-tuned", "int8") for t in domain.TASKS)
    base, tuned = ev["base"]["tasks"]["all"]["accuracy"], ev["fine-tuned"]["tasks"]["all"]["accuracy"]
    assert run["verdict"]["ok"], (run["verdict"], base, tuned)
    assert tuned > base and ev["int8"]["tasks"]["all"]["accuracy"] >= tuned - 10
    assert ev["fine-tuned"]["metrics"]["perplexity"] < ev["base"]["metrics"]["perplexity"]
    assert run["forgetting"]["ok"] and run["redteam"]["base"]["overall"]["attack_attempts"] > 0
    md = (out / "report.md").read_text()
    assert "| task accuracy (all) |" in md and "Red team: base vs fine-tuned" in md and "### Answers side by side" in md
    assert any("meets the bars" in line for line in lines)
    print(f"quick pretrained demo: base {base:.1f}% -> fine-tuned {tuned:.1f}% in {r.seconds:.0f} s {run['stages']}")
