"""`yunque data prepare | verify | inspect`: thin wrappers over yunque.data.pipeline."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from yunque.config import load_config
from yunque.data.config import DataConfig
from yunque.data.report import PII_DONE
from yunque.errors import ConfigError, DataError

FormatArg = Literal["auto", "alpaca", "chat", "completion", "text", "classification"]
_OVERRIDE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)*="
)  # key=value, not a path (unless such a file exists)


def prepare_cmd(
    *inputs: str,
    out: Path,
    config: Path | None = None,
    format: FormatArg | None = None,
    on_error: Literal["skip", "fail"] | None = None,
    tokenizer: str | None = None,
    workers: int | None = None,
    canaries: int | None = None,
) -> int:
    """Read, clean, scrub PII and secrets, deduplicate, split, hash (and tokenize) data into a directory.
    By default secrets and personal identifiers are redacted and IP addresses kept (and counted);
    pii.modes.TYPE=redact|drop|report|keep sets one type (e.g. pii.modes.email=keep).

    Args:
        inputs: data files, directories or globs (JSONL, JSON, CSV, TSV, Parquet, text; .gz too), and
            key=value settings over the config, as `yunque train` takes them (e.g. pii.modes.email=keep
            pii.modes.ipv4=redact split.seed=3)
        out: output directory; a previous prepared directory there is replaced
        config: data.yaml with any DataConfig option; the flags and key=value settings override it
        format: record shape; auto detects it per file and says what it chose
        on_error: skip bad records (counted, with examples) or fail at the first one
        tokenizer: tokenizer directory: enables token limits and writes token shards
        workers: worker processes (default: one per CPU core)
        canaries: plant this many unique canaries into the training split (canaries.rate of its records,
            1% by default), listed in canaries.json for `yunque redteam --canaries`; 0: none
    """
    from yunque.data.pipeline import prepare

    files = [a for a in inputs if not _OVERRIDE.match(a) or Path(a).exists()]
    extra = [a for a in inputs if a not in files]
    if not files:
        raise ConfigError("no input given: name the data files, directories or globs to read")
    for key, value in (
        ("read.format", format),
        ("read.on_error", on_error),
        ("tokenizer", tokenizer),
        ("workers", workers),
        ("canaries.count", canaries),
    ):
        if value is not None:
            extra.append(f"{key}={value}")
    cfg = load_config(DataConfig, config, extra)
    r = prepare(files, out, cfg)
    rep = r.report
    print(f"records in {r.records_in} = kept {r.records_kept} + dropped {sum(r.dropped.values())}")
    for reason, n in sorted(r.dropped.items()):
        first = rep["examples"].get(reason, [""])[0]
        print(f"  dropped {reason}: {n}" + (f"  (first: {first})" if first else ""))
    print("splits: " + ", ".join(f"{s} {n}" for s, n in r.splits.items()))
    if rep["pii_findings"]:
        done = rep["pii_modes"]
        print(
            "PII and secrets found: "
            + ", ".join(f"{t} {n} ({PII_DONE[done[t]]})" for t, n in rep["pii_findings"].items())
        )
        print("  per type: pii.modes.TYPE=redact|drop|report|keep, e.g. pii.modes.email=keep (see report.md)")
    ov = rep["cross_split_overlap"]
    print(f"cross-split overlap: exact {ov['exact']}, near {ov['near']}")
    if rep["canaries"]:
        c = rep["canaries"]
        print(f"canaries: {c['planted']} planted into {c['records']} training records; {r.out_dir / c['file']}")
    if rep["tokens"]:
        print("tokens: " + ", ".join(f"{s} {v['tokens']}" for s, v in rep["tokens"]["splits"].items()))
    print(f"wrote {r.out_dir} (report.md, manifest.json sha256 {r.manifest_sha256})")
    if r.records_kept == 0:  # nothing to train on: a failure for scripts, with the report kept to say why
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(r.dropped.items())) or "the inputs hold no records"
        raise DataError(f"no record survived: {r.records_in} read, all dropped ({why}); see {r.out_dir / 'report.md'}")
    return 0


def verify_cmd(dir: Path) -> int:
    """Recompute every hash of a prepared data directory; fail naming the file and record that changed.

    Args:
        dir: a directory written by `yunque data prepare`
    """
    import hashlib
    from pathlib import Path

    from yunque.data.pipeline import verify

    m = verify(dir)
    for s, info in m["splits"].items():
        print(f"{s}: {info['records']} records, merkle root {info['merkle_root']}")
    print(
        f"files: {len(m['files'])} verified; inputs: {len(m['inputs_checked'])} verified"
        + (f", {len(m['inputs_missing'])} not present here (not checked)" if m["inputs_missing"] else "")
    )
    print(f"OK  manifest sha256 {hashlib.sha256((Path(dir) / 'manifest.json').read_bytes()).hexdigest()}")
    return 0


def inspect_cmd(dir: Path, n: int = 3) -> int:
    """Show totals, length statistics and a few rendered examples with the masked tokens marked.

    Args:
        dir: a directory written by `yunque data prepare`
        n: number of examples to show
    """
    from yunque.data.pipeline import inspect

    print(inspect(dir, n))
    return 0
