"""`prepare`, `verify`, `inspect`: the Python API behind `yunque data ...`.

prepare(inputs, out_dir, cfg) streams every input once:

    read (main) -> [parse, map, clean, scrub PII, length limits, MinHash] (worker processes,
    ordered) -> exact dedup, near dedup, split assignment, write (main)

then, if asked, appends oversampled copies to the training split, plants canaries into it,
tokenizes and packs the splits into token shards, writes the report and finally the manifest
over all of it.
Memory stays flat in the input size except for the dedup index (16-byte content keys and,
with near dedup, one 512-byte signature plus the LSH band entries per kept record).

Output directory:

    train.jsonl val.jsonl test.jsonl   normalised records (see records.py), canonical JSON
    hashes/<split>.sha256              32-byte record hashes (see manifest.py)
    tokens/, tokenizer/                with a tokenizer (see shards.py)
    canaries.json                      with canaries: the planted ones (see canary.py)
    report.json report.md lengths.png  what happened (see report.py)
    manifest.json                      hashes of everything above + inputs, Merkle roots, config
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yunque.config import to_dict
from yunque.data import work
from yunque.data.config import DataConfig
from yunque.data.dedup import NearDupIndex
from yunque.data.manifest import SplitWriter, verify_dir, write_manifest
from yunque.data.read import expand_inputs, file_kind, iter_file, peek_objects
from yunque.data.records import canonical_json, detect_shape, get_path, label_of
from yunque.data.report import ERROR_REASONS, Stats, write_report
from yunque.data.split import SPLITS, Stratifier, copies_for, oversample_plan, split_of
from yunque.errors import ConfigError, DataError

CANARIES = "canaries.json"


@dataclass
class PrepareResult:
    out_dir: Path
    records_in: int
    records_kept: int
    dropped: dict[str, int]
    splits: dict[str, int]
    manifest_sha256: str
    report: dict[str, Any]


def prepare(inputs: list[str | Path], out_dir: str | Path, cfg: DataConfig | None = None, log=print) -> PrepareResult:
    """Read, clean, scrub, deduplicate, split, (tokenize) and hash `inputs` into `out_dir`."""
    cfg = cfg or DataConfig()
    out = Path(out_dir)
    files = expand_inputs(inputs)
    # Check everything a worker will need here: an exception in a pool initializer respawns forever.
    if cfg.pii.enabled:
        cfg.pii.effective()  # ConfigError for a type or mode set after loading
    if cfg.tokenizer is not None:
        if not Path(cfg.tokenizer).is_dir():
            raise ConfigError(f"tokenizer: {cfg.tokenizer} is not a tokenizer directory")
        from yunque.tokenizer import Tokenizer

        Tokenizer.from_dir(cfg.tokenizer)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise DataError(f"{out}: exists, is not empty and is not a prepared data directory; refusing to overwrite")
    # Build in a sibling staging directory and swap it in at the end: a failed or interrupted run
    # never leaves a half-written directory where training would look for data.
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / ".tmp").mkdir(parents=True)
    try:
        result = _prepare_into(stage, files, cfg, log)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)  # a previous prepared directory: replaced whole, never mixed with this run
    stage.rename(out)
    result.out_dir = out
    return result


def _prepare_into(out: Path, files: list[Path], cfg: DataConfig, log) -> PrepareResult:
    stats = Stats(
        max_examples=cfg.read.max_examples,
        length_unit="tokens" if cfg.tokenizer else "chars",
        pii_modes=dict(cfg.pii.effective()) if cfg.pii.enabled else {},
    )
    writers = [SplitWriter(out, s) for s in SPLITS]
    try:
        _stream(files, out, cfg, stats, writers, log)
        if cfg.split.oversample_ratio is not None:
            _oversample(out, cfg, stats, writers[0])
    finally:
        split_info = {s: w.close() for s, w in zip(SPLITS, writers)}
    stats.check()
    if cfg.canaries.count:
        split_info["train"] = _plant_canaries(out, cfg, stats, split_info["train"])
    shutil.rmtree(out / ".tmp", ignore_errors=True)  # on failure prepare() removes the whole staging directory
    if cfg.tokenizer is not None:
        from yunque.data.shards import write_shards

        stats.tokens = write_shards(out, Path(cfg.tokenizer), workers=_workers(cfg))
    report = write_report(out, stats)
    from yunque import __version__

    digest = write_manifest(
        out,
        version=__version__,
        config=to_dict(cfg),
        inputs=files,
        splits=split_info,
        extra={"software": _software(cfg)},
    )
    return PrepareResult(
        out,
        stats.records_in,
        stats.kept,
        dict(stats.dropped),
        {s: split_info[s]["records"] for s in SPLITS},
        digest,
        report,
    )


def _software(cfg: DataConfig) -> dict[str, str]:
    """Versions that can change the output bytes (Unicode tables for NFC, MinHash, tokenizer)."""
    import platform
    import unicodedata
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "unicode": unicodedata.unidata_version}
    for pkg, used in (("datasketch", cfg.dedup.near != "off"), ("tokenizers", cfg.tokenizer is not None)):
        if used:
            try:
                out[pkg] = version(pkg)
            except PackageNotFoundError:
                out[pkg] = "unknown"
    return out


def _workers(cfg: DataConfig) -> int:
    return cfg.workers or os.cpu_count() or 1


def _shape_for(path: Path, cfg: DataConfig, log) -> str:
    if cfg.read.format != "auto":
        return cfg.read.format
    if file_kind(path) == "text":
        shape = "text"
    else:
        samples = peek_objects(path)
        if cfg.read.explode:
            samples = [
                {**s, **e}
                for s in samples
                if isinstance(s, dict)
                for e in _first(s, cfg.read.explode)
                if isinstance(e, dict)
            ]
        shape = detect_shape(samples, cfg.read.fields) or "unknown"
    log(f"{path}: format auto -> {shape}")
    return shape


def _first(obj: dict, path: str) -> list:
    try:
        v = get_path(obj, path)
    except KeyError:
        return []
    return v[:1] if isinstance(v, list) else []


def _items(files: list[Path], cfg: DataConfig, stats: Stats, tmp: Path, log) -> Iterator[tuple]:
    for f in files:
        shape = _shape_for(f, cfg, log)
        stats.shapes[str(f)] = shape
        for item in iter_file(f, cfg.read.text_unit, tmp, blocks=True):
            yield (item.source, item.kind, item.payload, shape)


def _chunks(items: Iterator[tuple], size: int) -> Iterator[list[tuple]]:
    """Items in lists of `size`; a block of JSONL lines (already ~0.5 MB) travels alone."""
    chunk: list[tuple] = []
    for item in items:
        if item[1] == "lines":
            if chunk:
                yield chunk
                chunk = []
            yield [item]
            continue
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _results(files: list[Path], cfg: DataConfig, stats: Stats, tmp: Path, log) -> Iterator[tuple]:
    chunks = _chunks(_items(files, cfg, stats, tmp, log), cfg.chunk_size)
    n = _workers(cfg)
    if n == 1:
        work.init_worker(cfg)
        for chunk in chunks:
            yield from work.process_chunk(chunk)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(n, initializer=work.init_worker, initargs=(cfg,)) as pool:
        # A bounded window of chunks in flight, consumed in submission order: output identical to a
        # single-process run, and memory flat (Pool.imap would buffer results without limit
        # whenever this process is the slower side).
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(work.process_chunk, (chunk,)))
            if len(pending) >= 2 * n + 1:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _stream(files: list[Path], out: Path, cfg: DataConfig, stats: Stats, writers: list[SplitWriter], log) -> None:
    near = NearDupIndex(cfg.dedup.num_perm, cfg.dedup.threshold, cfg.dedup.seed) if cfg.dedup.near != "off" else None
    near_split = bytearray()  # split of each near-index key
    near_source: list[str] = []  # kept for duplicate examples in the report
    seen: dict[bytes, tuple[str, int]] = {}  # exact key -> (source, split)
    exact_overlap = 0
    stratify = Stratifier(cfg.split.seed, (cfg.split.train, cfg.split.val, cfg.split.test))
    for res in _results(files, cfg, stats, out / ".tmp", log):
        stats.records_in += 1
        if res[0] == "drop":
            _, source, reason, message, findings = res
            _count_pii(stats, findings)
            # A damaged file (truncated or corrupt gzip, unreadable Parquet) loses everything after the
            # break, an unknown amount: that is never a record to skip, whatever on_error says.
            if reason == "unreadable_file" or (cfg.read.on_error == "fail" and reason in ERROR_REASONS):
                raise DataError(f"{source}: {message}")
            stats.drop(reason, source, message)
            continue
        _, source, line, digest, key, sig, length, label, findings = res
        _count_pii(stats, findings)
        prev = seen.get(key)
        if prev is not None and cfg.dedup.exact:
            stats.drop("exact_duplicate", source, f"same content as {prev[0]}")
            _dup_example(stats, "exact", source, prev[0])
            continue
        if near is not None:
            bands = near.bands(sig)
            matches = near.matches(sig, bands)
            if matches and cfg.dedup.near == "remove":
                k, sim = matches[0]
                stats.drop("near_duplicate", source, f"near duplicate of {near_source[k]} (Jaccard ~{sim:.2f})")
                _dup_example(stats, "near", source, near_source[k], sim)
                continue
            if matches:  # group: join the cluster's split; a record linking two splits would leak, drop it
                found = {near_split[k] for k, _ in matches}
                if len(found) > 1:
                    stats.drop(
                        "near_duplicate_bridge",
                        source,
                        "near duplicate of records in different splits: "
                        + ", ".join(near_source[k] for k, _ in matches[:3]),
                    )
                    continue
                split = found.pop()
            else:
                split = _assign(prev, label, key, cfg, stratify)
            near.add(sig, bands)
            near_split.append(split)
            near_source.append(source)
        else:
            split = _assign(prev, label, key, cfg, stratify)
        if prev is not None and prev[1] != split:
            exact_overlap += 1
        if prev is None and (cfg.dedup.exact or label is not None):
            # Without exact dedup a hash-split record needs no memory: equal content, equal split.
            seen[key] = (source, split)
        writers[split].write_hashed(line, digest)
        stats.keep(split, label, length)
    stats.overlap = {
        "exact": exact_overlap,
        "near": _near_overlap(near, near_split) if near is not None else "not measured (dedup.near: off)",
    }


def _assign(prev: tuple[str, int] | None, label, key: bytes, cfg: DataConfig, stratify: Stratifier) -> int:
    if prev is not None:  # an exact duplicate kept (dedup.exact off) follows its first copy
        return prev[1]
    if label is not None and cfg.split.stratify:
        return stratify(str(label))
    return split_of(key, cfg.split.seed, (cfg.split.train, cfg.split.val, cfg.split.test))


def _near_overlap(near: NearDupIndex, splits: bytearray) -> int:
    """Kept records in val/test with a confirmed near duplicate in another split (re-queried after
    the whole index is built, so a match inserted later than a record is seen too)."""
    n = 0
    for k in range(near.size):
        if splits[k] != 0 and any(splits[j] != splits[k] for j, _ in near.matches(near.signature(k)) if j != k):
            n += 1
    return n


def _count_pii(stats: Stats, findings: dict[str, int] | None) -> None:
    if findings:
        stats.pii.update(findings)
        stats.pii_records += 1


def _dup_example(stats: Stats, kind: str, removed: str, kept: str, sim: float | None = None) -> None:
    if len(stats.dup_examples) < 2 * stats.max_examples:
        stats.dup_examples.append(
            {
                "kind": kind,
                "removed": removed,
                "kept": kept,
                **({"similarity": round(sim, 3)} if sim is not None else {}),
            }
        )


def _oversample(out: Path, cfg: DataConfig, stats: Stats, train: SplitWriter) -> None:
    """Append copies of minority-label training records (marked "oversampled": true) to train.jsonl."""
    if not any(stats.labels[s] for s in SPLITS):
        kinds = ", ".join(sorted(set(stats.shapes.values())))
        raise ConfigError(
            f"split.oversample_ratio: no record has a label to balance (input shapes: {kinds}); chat, "
            "alpaca and completion records take theirs from a `label` field (read.fields.label maps "
            "another), or set split.label_from: answer to group by the final answer"
        )
    counts = dict(stats.labels["train"])
    plan = oversample_plan(counts, cfg.split.oversample_ratio)
    stats.labels_after = {s: stats.labels[s].copy() for s in SPLITS}
    if not plan:
        return
    train.flush()
    n = stats.split_counts["train"]
    seen: dict[str, int] = {}
    with open(out / train.file, "rb") as fh:
        for line in itertools.islice(fh, n):
            rec = json.loads(line)
            lab = str(label_of(rec, cfg.split.label_from))
            if lab not in plan:
                continue
            j = seen[lab] = seen.get(lab, -1) + 1
            for _ in range(copies_for(j, counts[lab], plan[lab])):
                train.write(canonical_json({**rec, "oversampled": True}))
                stats.oversampled += 1
                stats.labels_after["train"][lab] += 1


def _plant_canaries(out: Path, cfg: DataConfig, stats: Stats, train: dict) -> dict:
    """Canaries into the training split only (after splitting, so val and test never hold one, and
    after PII scrubbing, which would redact them); canaries.json lists the planted ones."""
    from yunque.data.canary import make_canaries, plant_split, save_canaries

    c = cfg.canaries
    p = plant_split(out, train, make_canaries(c.count, c.seed), c.rate, c.seed, stats.max_examples)
    save_canaries(p.canaries, out / CANARIES)
    stats.canaries = {
        "split": "train",
        "file": CANARIES,
        "requested": c.count,
        "planted": len(p.canaries),
        "records": p.records,
        "split_records": train["records"],
        "rate": round(p.records / train["records"], 6),
        "seed": c.seed,
        "examples": p.examples,
    }
    return p.split_info


def verify(out_dir: str | Path) -> dict:
    """Recompute every hash of a prepared directory; DataError names the file and record that differ."""
    return verify_dir(Path(out_dir))


def inspect(out_dir: str | Path, n: int = 3) -> str:
    """A human-readable summary: totals, lengths, and a few rendered examples with masks marked."""
    out = Path(out_dir)
    m = verify_dir(out)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    unit = "tokens" if "mean_length_tokens" in report["splits"]["train"] else "chars"
    lines = [
        f"{out}: {report['records_in']} records in, {report['records_kept']} kept, {report['records_dropped']} dropped",
        "splits: "
        + ", ".join(
            f"{s} {v['records']} (mean length {v[f'mean_length_{unit}']} {unit})" for s, v in report["splits"].items()
        ),
    ]
    if (out / "tokens").is_dir():
        from yunque.data.shards import render_examples

        lines.append(render_examples(out, n))
    else:
        with open(out / m["splits"]["train"]["file"], encoding="utf-8") as fh:
            for line in itertools.islice(fh, n):
                lines.append(line.rstrip("\n")[:500])
    return "\n".join(lines)
