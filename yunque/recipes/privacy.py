"""`yunque privacy-audit`: canary exposure and membership inference against a (fine-tuned) model."""

from __future__ import annotations

from pathlib import Path


def privacy_audit_cmd(
    *,
    model: Path,
    data: Path,
    adapter: Path | None = None,
    reference: Path | None = None,
    out: Path = Path("privacy-audit"),
    candidates: int = 1000,
    max_records: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
) -> int:
    """Measure what a model gives away about its training records: canary exposure and membership inference.

    Args:
        model: model directory (Hugging Face format), or the base model of --adapter
        data: the `yunque data prepare` directory the model was trained on (train.jsonl, test.jsonl or val.jsonl,
            canaries.json when canaries were planted)
        adapter: LoRA adapter directory (PEFT format) merged into --model; the model alone is then the reference
        reference: a model not trained on the data, to calibrate the attack and compare exposure (default: --model
            when --adapter is given)
        out: output directory for audit.md, audit.json and audit.png
        candidates: random secrets each canary is ranked among (at least 1000)
        max_records: members and non-members scored (as many of each)
        seed: sampling seed (records, candidates, bootstrap)
        batch_size: rows per forward pass
    """
    from yunque.evaluate.privacy_audit import run_audit, write_audit

    r = run_audit(
        model,
        data,
        adapter=adapter,
        reference=reference,
        candidates=candidates,
        max_records=max_records,
        seed=seed,
        batch_size=batch_size,
    )
    write_audit(r, out)
    a = r["loss_attack"]
    line = f"membership inference: AUC {a['auc']:.3f}, TPR at 1% FPR {a['tpr_at_1pct_fpr']:.3f}"
    if "calibrated_attack" in r:
        c = r["calibrated_attack"]
        line += f"; calibrated AUC {c['auc']:.3f}, TPR at 1% FPR {c['tpr_at_1pct_fpr']:.3f}"
    print(line)
    if "exposure" in r:
        e = r["exposure"]
        ref = f" (reference {e['reference_mean']:.2f})" if e["reference_mean"] is not None else ""
        print(f"canary exposure: mean {e['mean']:.2f} of {e['max_bits']:.2f} bits{ref}")
    print(f"report: {out / 'audit.md'}")
    return 0
