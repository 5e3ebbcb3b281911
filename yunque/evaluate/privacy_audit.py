"""Privacy audit: what a fine-tuned model gives away about its training records, measured two ways.

- Canary exposure (Carlini et al., "The Secret Sharer", 2019): the canaries `data prepare --canaries N`
  planted in the training split (canaries.json) are ranked by likelihood among >= 1,000 random secrets
  of the same form (yunque.evaluate.canary.canary_exposure). Exposure = log2(candidates) - log2(rank):
  about 1 bit for a model that never saw the canary, log2(candidates) for one that reproduces it. The
  same is measured on the reference model (the base, without the fine-tune) for comparison.
- Membership inference by loss threshold (Yeom et al., 2018): a record is called a training member
  when the model's mean token loss on it is low. Members are training records, non-members the
  held-out test (else validation) records, as many of each. With a reference model the score is
  calibrated by the record's difficulty (Watson et al., 2022): reference loss minus model loss, which
  separates "easy text" from "memorised text". Reported: ROC AUC (0.5 = chance) and the true-positive
  rate at 1% false positives (the attack's low-error regime, Carlini et al., 2022), each with a
  bootstrap 95% interval over members and non-members resampled separately.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from yunque.errors import DataError, YunqueError

MIN_CANDIDATES = 1000


# ---------------------------------------------------------------- statistics


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting half (Mann-Whitney U / (n_pos n_neg))."""
    x = np.concatenate([pos, neg])
    order = np.argsort(x, kind="mergesort")
    _, inv, counts = np.unique(x[order], return_inverse=True, return_counts=True)
    avg = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = np.empty(len(x))
    ranks[order] = avg[inv]
    n, m = len(pos), len(neg)
    return float((ranks[:n].sum() - n * (n + 1) / 2.0) / (n * m))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """Members found with at most `fpr` of the non-members called members (threshold strictly above them)."""
    k = int(math.floor(fpr * len(neg)))  # false positives allowed
    tau = np.sort(neg)[::-1][min(k, len(neg) - 1)]
    return float((pos > tau).mean())


def roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) over every threshold, from (0, 0) to (1, 1)."""
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-x, kind="mergesort")
    x, y = x[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(x)), len(x) - 1]  # the last index of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    return np.r_[0.0, fp / len(neg)], np.r_[0.0, tp / len(pos)]


def bootstrap_ci(pos, neg, stat, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of `stat(pos, neg)` over `n` resamples of members and non-members."""
    rng = np.random.default_rng(seed)
    vals = [stat(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]) for _ in range(n)]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def attack(pos: np.ndarray, neg: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict:
    """AUC and TPR at 1% FPR (with 95% intervals) of scores where higher means "member"."""
    fpr, tpr = roc(pos, neg)
    return {
        "auc": auc(pos, neg),
        "auc_ci95": bootstrap_ci(pos, neg, auc, resamples, seed),
        "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg),
        "tpr_at_1pct_fpr_ci95": bootstrap_ci(pos, neg, tpr_at_fpr, resamples, seed + 1),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


# ---------------------------------------------------------------- scoring


@torch.inference_mode()
def record_losses(model, docs: list, batch_size: int = 16, max_length: int = 1024) -> np.ndarray:
    """Mean loss (nats per trained token) of each document (ids, loss mask); NaN for one without trained tokens."""
    from yunque.train.packing import ArraySource
    from yunque.train.privacy import record_rows
    from yunque.train.step import to_device

    src = ArraySource.from_docs(docs)
    device = model.model.embed_tokens.weight.device
    order = np.argsort(src.lengths(), kind="stable")
    out = np.full(len(docs), np.nan)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        b, _ = record_rows(src, idx, max_length, 0)
        db = to_device(b, device)
        h = model.hidden(db.input_ids, db.positions).reshape(-1, model.config.hidden_size)
        owner = torch.div(db.target_idx, b.input_ids.shape[1], rounding_mode="floor")
        nll = torch.empty(len(db.targets), dtype=torch.float64, device=device)
        for c in range(0, len(db.targets), 2048):  # a vocabulary-sized row per trained token, a chunk at a time
            sl = slice(c, c + 2048)
            logits = model.lm_head(h.index_select(0, db.target_idx[sl])).float()
            nll[sl] = F.cross_entropy(logits, db.targets[sl], reduction="none").double()
        sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, owner, nll)
        counts = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, owner, torch.ones_like(nll))
        out[idx] = (sums / counts).cpu().numpy()  # 0 / 0: NaN
    return out


def _read_records(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON: {e.msg}") from None
    return out


def _encode(tok, records: list[dict], where: str) -> list:
    from yunque.data.records import RecordError, parse
    from yunque.train.config import TrainConfig
    from yunque.train.documents import Encoder

    enc = Encoder(tok, TrainConfig())  # as training encodes by default: prompts masked, BOS and EOS
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(enc.record(parse(rec)))
        except RecordError as e:
            raise DataError(f"{where}: record {i + 1}: {e}") from None
    return out


@dataclass
class Sample:
    """The records the attack is scored on: as many members as non-members."""

    members: list[dict]
    nonmembers: list[dict]
    nonmember_split: str


def sample_records(data_dir: Path, max_records: int, seed: int) -> Sample:
    train = data_dir / "train.jsonl"
    if not train.is_file():
        raise DataError(f"{data_dir}: no train.jsonl (a `yunque data prepare` output directory)")
    held = next((data_dir / f"{s}.jsonl" for s in ("test", "val") if (data_dir / f"{s}.jsonl").is_file()), None)
    if held is None:
        raise DataError(f"{data_dir}: no test.jsonl or val.jsonl: membership inference needs held-out records")
    m, n = _read_records(train), _read_records(held)
    if not m or not n:
        raise DataError(f"{data_dir}: {train.name if not m else held.name} has no records")
    k = min(len(m), len(n), max_records)
    rng = random.Random(seed)
    return Sample(rng.sample(m, k), rng.sample(n, k), held.stem)


def score(model, tok, sample: Sample, canaries, candidates: int, seed: int, batch_size: int) -> dict:
    """One model's per-record losses (members, non-members) and canary exposures."""
    from yunque.evaluate.canary import canary_exposure

    max_len = min(model.config.max_position_embeddings, 2048)
    return {
        "members": record_losses(model, _encode(tok, sample.members, "train.jsonl"), batch_size, max_len),
        "nonmembers": record_losses(
            model, _encode(tok, sample.nonmembers, f"{sample.nonmember_split}.jsonl"), batch_size, max_len
        ),
        "exposure": canary_exposure(model, tok, canaries, candidates, seed, batch_size) if canaries else [],
    }


def _finite_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.isfinite(a) & np.isfinite(b)


def run_audit(
    model_dir: Path,
    data_dir: Path,
    *,
    adapter: Path | None = None,
    reference: Path | None = None,
    candidates: int = MIN_CANDIDATES,
    max_records: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    resamples: int = 1000,
) -> dict:
    """The audit of `model_dir` (+ `adapter`) on `data_dir`; the reference is `reference`, else the base
    model under an adapter, else none (uncalibrated attack only, no exposure baseline)."""
    from yunque.data.canary import load_canaries
    from yunque.evaluate.loading import load_for_eval

    if candidates < MIN_CANDIDATES:
        raise YunqueError(f"candidates: at least {MIN_CANDIDATES} (exposure's resolution is log2(candidates) bits)")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    canaries = load_canaries(data_dir / "canaries.json") if (data_dir / "canaries.json").is_file() else []
    sample = sample_records(data_dir, max_records, seed)
    model, tok = load_for_eval(model_dir, adapter)
    target = score(model, tok, sample, canaries, candidates, seed, batch_size)
    del model
    ref_dir = reference if reference is not None else (model_dir if adapter is not None else None)
    ref = None
    if ref_dir is not None:
        rmodel, rtok = load_for_eval(ref_dir)
        ref = score(rmodel, rtok, sample, canaries, candidates, seed, batch_size)
        del rmodel
    mt, nt = target["members"], target["nonmembers"]
    keep_m, keep_n = np.isfinite(mt), np.isfinite(nt)
    if ref is not None:
        keep_m &= np.isfinite(ref["members"])
        keep_n &= np.isfinite(ref["nonmembers"])
    if keep_m.sum() < 2 or keep_n.sum() < 2:
        raise DataError(f"{data_dir}: fewer than 2 scorable records (with trained tokens) on a side")
    result = {
        "model": str(model_dir),
        "adapter": str(adapter) if adapter else None,
        "reference": str(ref_dir) if ref_dir is not None else None,
        "data": str(data_dir),
        "nonmember_split": sample.nonmember_split,
        "members": int(keep_m.sum()),
        "nonmembers": int(keep_n.sum()),
        "candidates": candidates,
        "seed": seed,
        "loss": {
            "members_mean": float(mt[keep_m].mean()),
            "nonmembers_mean": float(nt[keep_n].mean()),
        },
        "loss_attack": attack(-mt[keep_m], -nt[keep_n], resamples, seed),
    }
    if ref is not None:
        cm = ref["members"][keep_m] - mt[keep_m]
        cn = ref["nonmembers"][keep_n] - nt[keep_n]
        result["calibrated_attack"] = attack(cm, cn, resamples, seed)
    if canaries:
        bits = math.log2(candidates)
        result["exposure"] = {
            "max_bits": bits,
            "canaries": [
                {"prefix": c.prefix, "exposure": e, **({"reference_exposure": ref["exposure"][i]} if ref else {})}
                for i, (c, e) in enumerate(zip(canaries, target["exposure"]))
            ],
            "mean": float(np.mean(target["exposure"])),
            "reference_mean": float(np.mean(ref["exposure"])) if ref else None,
        }
    return result


# ---------------------------------------------------------------- report


def _ci(v: float, ci) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(r: dict) -> str:
    lines = [
        "# Privacy audit",
        "",
        f"Model `{r['model']}`"
        + (f" + adapter `{r['adapter']}`" if r["adapter"] else "")
        + f", data `{r['data']}`"
        + (f", reference `{r['reference']}`" if r["reference"] else ", no reference model")
        + ".",
        "",
        "## Membership inference",
        "",
        f"{r['members']} training records (members) against {r['nonmembers']} {r['nonmember_split']} records "
        f"(non-members). Mean loss: members {r['loss']['members_mean']:.4f}, non-members "
        f"{r['loss']['nonmembers_mean']:.4f} nats/token. AUC 0.5 and TPR 0.01 at 1% FPR are chance; "
        "intervals are bootstrap 95%.",
        "",
        "| attack | AUC | TPR at 1% FPR |",
        "|---|---|---|",
    ]
    for key, name in (("loss_attack", "loss threshold"), ("calibrated_attack", "reference-calibrated loss")):
        if key in r:
            a = r[key]
            tpr = _ci(a["tpr_at_1pct_fpr"], a["tpr_at_1pct_fpr_ci95"])
            lines.append(f"| {name} | {_ci(a['auc'], a['auc_ci95'])} | {tpr} |")
    lines.append("")
    e = r.get("exposure")
    if e:
        lines += [
            "## Canary exposure",
            "",
            f"Each planted canary's secret ranked among {r['candidates']} random secrets of its form; exposure = "
            f"log2({r['candidates']}) - log2(rank), from about 1 bit (not memorised) to {e['max_bits']:.2f} bits.",
            "",
            "| canary prefix | exposure (bits) |" + (" reference (bits) |" if e["reference_mean"] is not None else ""),
            "|---|---|" + ("---|" if e["reference_mean"] is not None else ""),
        ]
        for c in e["canaries"]:
            ref = f" {c['reference_exposure']:.2f} |" if "reference_exposure" in c else ""
            lines.append(f"| {c['prefix']} | {c['exposure']:.2f} |{ref}")
        mean_ref = f" {e['reference_mean']:.2f} |" if e["reference_mean"] is not None else ""
        lines += [f"| **mean** | {e['mean']:.2f} |{mean_ref}", ""]
    else:
        lines += ["No canaries.json in the data directory: no exposure measured.", ""]
    lines += ["![audit](audit.png)", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> bool:
    """audit.png: ROC curves (log-scale FPR) and the exposure histogram; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, name in (("loss_attack", "loss"), ("calibrated_attack", "calibrated")):
        if key in r:
            a = r[key]
            ax1.plot(a["roc"]["fpr"], a["roc"]["tpr"], label=f"{name} (AUC {a['auc']:.3f})")
    ax1.plot([1e-3, 1], [1e-3, 1], "k:", lw=1, label="chance")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlim(1e-3, 1)
    ax1.set_ylim(1e-3, 1)
    ax1.set_xlabel("false positive rate")
    ax1.set_ylabel("true positive rate")
    ax1.set_title("membership inference")
    ax1.legend(fontsize=8)
    e = r.get("exposure")
    if e:
        bins = np.linspace(0, e["max_bits"], 21)
        ax2.hist([c["exposure"] for c in e["canaries"]], bins=bins, alpha=0.7, label="model")
        if e["reference_mean"] is not None:
            ax2.hist([c["reference_exposure"] for c in e["canaries"]], bins=bins, alpha=0.5, label="reference")
        ax2.legend(fontsize=8)
    ax2.set_xlabel("exposure (bits)")
    ax2.set_ylabel("canaries")
    ax2.set_title("canary exposure")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)  # never a planted link
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def write_audit(r: dict, out: Path) -> list[Path]:
    """audit.json, audit.md and audit.png in `out`."""
    from yunque.untrusted import write_replacing

    out.mkdir(parents=True, exist_ok=True)
    write_replacing(out / "audit.json", json.dumps(r, indent=1) + "\n")
    write_replacing(out / "audit.md", markdown(r))
    written = [out / "audit.json", out / "audit.md"]
    if plot(r, out / "audit.png"):
        written.append(out / "audit.png")
    return written
