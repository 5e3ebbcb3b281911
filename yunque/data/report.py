"""Counting everything `prepare` does, and writing it as report.json, report.md and lengths.png.

Counts reconcile by construction: every record that enters is either written to a split
or dropped with exactly one reason (`Stats.check()` asserts records_in == kept + dropped).
The report never contains a detected PII value: only types and counts, and example
positions (`file:line`). Nothing time-dependent goes in, so the same run gives the same
report bytes (the manifest hashes it).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yunque.data.split import SPLITS

# Reasons that mean "bad input" (subject to on_error=fail) as opposed to filtering decisions.
ERROR_REASONS = {
    "invalid_json",
    "invalid_utf8",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "wrong_columns",
    "bad_role",
    "no_assistant_turn",
    "empty_file",
    "unreadable_file",
    "unsupported_file",
    "unknown_shape",
    "unsupported_shape",
}
_BINS = 32  # log2 length bins: bin b holds lengths in [2^(b-1), 2^b)
PII_DONE = {"redact": "redacted", "drop": "record dropped", "report": "kept, counted", "keep": "kept"}


@dataclass
class Stats:
    max_examples: int = 5
    records_in: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    shapes: dict[str, str] = field(default_factory=dict)
    pii: Counter = field(default_factory=Counter)
    pii_records: int = 0
    pii_modes: dict[str, str] = field(default_factory=dict)  # type -> mode, every type (empty: scrubbing off)
    dup_examples: list[dict] = field(default_factory=list)
    split_counts: Counter = field(default_factory=Counter)
    labels: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    labels_after: dict[str, Counter] | None = None
    oversampled: int = 0
    hist: dict[str, list[int]] = field(default_factory=lambda: {s: [0] * _BINS for s in SPLITS})
    length_sum: Counter = field(default_factory=Counter)
    length_unit: str = "chars"
    overlap: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)
    canaries: dict[str, Any] = field(default_factory=dict)

    def drop(self, reason: str, source: str, message: str) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{source}: {message}")

    def keep(self, split: int, label: Any, length: int) -> None:
        name = SPLITS[split]
        self.kept += 1
        self.split_counts[name] += 1
        if label is not None:
            self.labels[name][str(label)] += 1
        self.hist[name][min(_BINS - 1, max(0, length).bit_length())] += 1
        self.length_sum[name] += length

    def check(self) -> None:
        total = self.kept + sum(self.dropped.values())
        if total != self.records_in:  # a bug, not a user error: counts must always reconcile
            raise AssertionError(
                f"counts do not reconcile: in {self.records_in} != kept {self.kept} + dropped {total - self.kept}"
            )

    def to_json(self) -> dict[str, Any]:
        splits = {}
        for s in SPLITS:
            n = self.split_counts[s]
            splits[s] = {
                "records": n + (self.oversampled if s == "train" else 0),
                "unique_records": n,
                f"mean_length_{self.length_unit}": round(self.length_sum[s] / n, 1) if n else 0,
                "length_histogram_log2": self.hist[s],
            }
            if any(self.labels[x] for x in SPLITS):
                splits[s]["labels"] = dict(sorted(self.labels[s].items()))
                if self.labels_after is not None:
                    splits[s]["labels_after_oversampling"] = dict(sorted(self.labels_after[s].items()))
        missing = (
            sorted({lab for s in SPLITS for lab in self.labels[s]} - set(self.labels["val"]) - set(self.labels["test"]))
            if any(self.labels[s] for s in SPLITS)
            else []
        )
        return {
            "records_in": self.records_in,
            "records_kept": self.kept,
            "records_dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "input_errors": sum(n for r, n in self.dropped.items() if r in ERROR_REASONS),
            "examples": {k: v for k, v in sorted(self.examples.items())},
            "shapes": self.shapes,
            "pii_findings": dict(sorted(self.pii.items())),
            "pii_records_with_findings": self.pii_records,
            "pii_modes": dict(sorted(self.pii_modes.items())),
            "dedup": {
                "exact_removed": self.dropped["exact_duplicate"],
                "near_removed": self.dropped["near_duplicate"],
                "near_bridge_removed": self.dropped["near_duplicate_bridge"],
                "examples": self.dup_examples,
            },
            "splits": splits,
            "oversampled_copies": self.oversampled,
            "labels_missing_from_val_and_test": missing,
            "cross_split_overlap": self.overlap,
            "tokens": self.tokens,
            "canaries": self.canaries,
        }


def write_report(out_dir: Path, stats: Stats) -> dict[str, Any]:
    data = stats.to_json()
    # Examples quote the input; bytes that were not UTF-8 are written escaped rather than failing the run.
    (out_dir / "report.json").write_text(
        json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8", errors="backslashreplace"
    )
    (out_dir / "report.md").write_text(_markdown(data, stats.length_unit), encoding="utf-8", errors="backslashreplace")
    _histogram(out_dir / "lengths.png", stats)
    return data


def _markdown(d: dict[str, Any], unit: str) -> str:
    L = [
        "# Data preparation report",
        "",
        f"Records in: **{d['records_in']}** = kept **{d['records_kept']}** + dropped **{d['records_dropped']}**",
        "",
    ]
    if d["shapes"]:
        L += (
            ["## Inputs", "", "| file | shape |", "|---|---|"]
            + [f"| {f} | {s} |" for f, s in d["shapes"].items()]
            + [""]
        )
    if d["dropped_by_reason"]:
        L += ["## Dropped, by reason", "", "| reason | records | first examples |", "|---|---:|---|"]
        for r, n in d["dropped_by_reason"].items():
            ex = "<br>".join(e.replace("|", "\\|") for e in d["examples"].get(r, []))
            L.append(f"| {r} | {n} | {ex} |")
        L.append("")
    L += ["## PII and secrets (counts only; values are never shown)", ""]
    modes = d["pii_modes"]
    if not modes:
        L.append("Not scanned (pii.enabled: false).")
    elif d["pii_findings"]:
        L += ["| type | findings | done |", "|---|---:|---|"]
        L += [f"| {t} | {n} | {PII_DONE[modes[t]]} |" for t, n in d["pii_findings"].items()]
        L += [
            "",
            (
                f"Records with at least one finding: {d['pii_records_with_findings']} "
                "(counted over every record scanned, duplicates removed later included)"
            ),
        ]
    else:
        L.append("No findings.")
    if modes:
        kept = [t for t, m in modes.items() if m in ("report", "keep")]
        L += [
            "",
            (
                "Kept in the data: " + (", ".join(kept) if kept else "none") + ". Set a type with "
                "`pii.modes.TYPE=redact|drop|report|keep` (e.g. `pii.modes.email=keep`); defaults and reasons: "
                "`yunque.data.config.PII_DEFAULTS`."
            ),
        ]
    dd = d["dedup"]
    L += [
        "",
        "## Deduplication",
        "",
        (
            f"Exact duplicates removed: {dd['exact_removed']}; near duplicates removed: "
            f"{dd['near_removed']}; removed as bridges between clusters in different splits: {dd['near_bridge_removed']}"  # noqa: E501
        ),
        "",
    ]
    for ex in dd["examples"]:
        sim = f" (Jaccard ~{ex['similarity']:.2f})" if "similarity" in ex else ""
        L.append(f"- {ex['kind']}: {ex['removed']} duplicates {ex['kept']}{sim}")
    L += ["", "## Splits", "", f"| split | records | unique | mean length ({unit}) |", "|---|---:|---:|---:|"]
    for s, v in d["splits"].items():
        L.append(f"| {s} | {v['records']} | {v['unique_records']} | {v[f'mean_length_{unit}']} |")
    if any("labels" in v for v in d["splits"].values()):
        L += ["", "Labels per split (before -> after oversampling, train only):", ""]
        for s, v in d["splits"].items():
            after = v.get("labels_after_oversampling")
            L.append(f"- {s}: {v.get('labels', {})}" + (f" -> {after}" if after and after != v.get("labels") else ""))
        if d["labels_missing_from_val_and_test"]:
            L.append(f"- labels absent from both val and test: {d['labels_missing_from_val_and_test']}")
    ov = d["cross_split_overlap"]
    L += ["", "## Cross-split overlap (must be 0)", "", f"- exact: {ov.get('exact')}", f"- near: {ov.get('near')}"]
    if d["canaries"]:
        c = d["canaries"]
        L += [
            "",
            "## Canaries",
            "",
            (
                f"{c['records']} of {c['split_records']} training records ({c['rate']:.2%}) carry one of "
                f"{c['planted']} planted canaries ({c['requested']} requested, seed {c['seed']}); val and test carry none. "  # noqa: E501
                f"The secrets are in `{c['file']}`; measure memorisation with `yunque redteam --model MODEL --canaries DIR/{c['file']}`."  # noqa: E501
            ),
            "",
        ]
        L += [f"- {src}" for src in c["examples"]]
    if d["tokens"]:
        L += ["", "## Tokens", "", "| split | documents | tokens | trained tokens |", "|---|---:|---:|---:|"]
        for s, v in d["tokens"].get("splits", {}).items():
            L.append(f"| {s} | {v['documents']} | {v['tokens']} | {v['trained_tokens']} |")
    L += ["", "Length histogram per split: `lengths.png`.", ""]
    return "\n".join(L)


def _histogram(path: Path, stats: Stats) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPLITS), figsize=(4 * len(SPLITS), 3), sharey=False)
    for ax, s in zip(axes, SPLITS):
        counts = stats.hist[s]
        last = max([i for i, c in enumerate(counts) if c] or [1])
        edges = [0] + [2**b for b in range(last + 1)]
        ax.bar(range(last + 1), counts[: last + 1], width=0.9, color="#4477aa")
        step = max(1, math.ceil((last + 1) / 8))
        ax.set_xticks(
            range(0, last + 1, step), [str(edges[i]) for i in range(0, last + 1, step)], rotation=45, fontsize=7
        )
        ax.set_title(f"{s} ({stats.split_counts[s]} records)", fontsize=9)
        ax.set_xlabel(f"length ({stats.length_unit}, log2 bins, lower edge)", fontsize=8)
    axes[0].set_ylabel("records")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.3, top=0.88, wspace=0.25)  # tight_layout costs a second
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
