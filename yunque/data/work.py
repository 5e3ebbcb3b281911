"""Per-record work that runs in worker processes: parse, map, clean, scrub, measure, sign.

Everything here is a pure function of one raw item and the config, which is what lets
`prepare` fan chunks out to all cores with an ordered `imap` and still produce the same
bytes as a single-process run. A worker returns plain tuples (no objects with behaviour):

    ("drop", source, reason, message, pii_counts)
    ("ok", source, line, sha256, exact_key, signature | None, length, label, pii_counts)

where `line` is the record's canonical JSON (UTF-8 bytes) including its source, and `sha256`
its digest for the manifest (hashing here keeps that work off the single main process).
"""

from __future__ import annotations

import hashlib
from typing import Any

from yunque.data.clean import clean_text
from yunque.data.config import DataConfig
from yunque.data.dedup import MinHasher, exact_key
from yunque.data.pii import scrub
from yunque.data.records import (
    RecordError,
    canonical_json,
    content_text,
    label_of,
    set_text_fields,
    text_fields,
    to_records,
)

_STATE: dict[str, Any] = {}


def init_worker(cfg: DataConfig) -> None:
    _STATE["cfg"] = cfg
    _STATE["minhash"] = (
        MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle_size, cfg.dedup.seed) if cfg.dedup.near != "off" else None
    )
    _STATE["pii_modes"] = cfg.pii.effective() if cfg.pii.enabled else None
    tok = None
    if cfg.tokenizer is not None:
        from yunque.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(cfg.tokenizer)
    _STATE["tok"] = tok


def process_chunk(chunk: list[tuple[str, str, Any, str]]) -> list[tuple]:
    out: list[tuple] = []
    for source, kind, payload, shape in chunk:
        out.extend(process_item(source, kind, payload, shape))
    return out


def process_item(source: str, kind: str, payload: Any, shape: str) -> list[tuple]:
    from yunque.data.read import RawItem

    cfg: DataConfig = _STATE["cfg"]
    if kind == "lines":
        path, first = source.rsplit(":", 1)
        out: list[tuple] = []
        for i, raw in enumerate(payload.split(b"\n"), int(first)):
            if raw.strip():
                out.extend(process_item(f"{path}:{i}", "line", raw, shape))
        return out
    if shape == "unknown" and kind != "error":
        return [
            ("drop", source, "unknown_shape", "cannot tell the record shape; pass --format or a field mapping", None)
        ]
    results = []
    for src, rec in to_records(RawItem(source, kind, payload), shape, cfg.read.fields, cfg.read.explode):
        if isinstance(rec, RecordError):
            results.append(("drop", src, rec.reason, str(rec), None))
        else:
            results.append(_finish(src, rec, cfg))
    return results


def _finish(source: str, rec: dict, cfg: DataConfig) -> tuple:
    texts = text_fields(rec)
    if cfg.clean.normalize:
        texts = [clean_text(t) for t in texts]
    if not all(t.strip() for t in _required(rec, texts)):
        return ("drop", source, "empty_text", "a required text field is empty after cleaning", None)
    findings: dict[str, int] = {}
    modes = _STATE["pii_modes"]
    if modes is not None:
        scrubbed = []
        drop_types: list[str] = []
        for t in texts:
            r = scrub(t, modes)
            scrubbed.append(r.text)
            for typ, n in r.findings.items():
                findings[typ] = findings.get(typ, 0) + n
            if r.drop:
                drop_types.extend(typ for typ in r.findings if modes[typ] == "drop")
        if drop_types:
            # Only the type is reported, never the value that was found.
            return ("drop", source, "pii_drop", f"contains {', '.join(sorted(set(drop_types)))}", findings)
        texts = scrubbed
    rec = set_text_fields(rec, texts)
    content = content_text(rec)
    n_chars = len(content)
    if n_chars < cfg.clean.min_chars:
        return ("drop", source, "too_short", f"{n_chars} characters < min_chars {cfg.clean.min_chars}", findings)
    if n_chars > cfg.clean.max_chars:
        return ("drop", source, "too_long", f"{n_chars} characters > max_chars {cfg.clean.max_chars}", findings)
    length = n_chars
    tok = _STATE["tok"]
    if tok is not None:
        length = len(tok.encode(content))
        if length < cfg.clean.min_tokens:
            return ("drop", source, "too_few_tokens", f"{length} tokens < min_tokens {cfg.clean.min_tokens}", findings)
        if cfg.clean.max_tokens is not None and length > cfg.clean.max_tokens:
            return ("drop", source, "too_many_tokens", f"{length} tokens > max_tokens {cfg.clean.max_tokens}", findings)
    mh = _STATE["minhash"]
    sig = mh(content) if mh is not None else None
    rec["source"] = source
    label = label_of(rec, cfg.split.label_from)
    line = canonical_json(rec).encode("utf-8")
    return ("ok", source, line, hashlib.sha256(line).digest(), exact_key(content), sig, length, label, findings)


def _required(rec: dict, texts: list[str]) -> list[str]:
    # A chat may have an empty system prompt, a reply that only calls tools, and a tool that
    # returned nothing; an alpaca `input` is already folded in.
    if rec["kind"] == "chat":
        return [
            t
            for m, t in zip(rec["messages"], texts)
            if m["role"] == "user" or (m["role"] == "assistant" and "tool_calls" not in m)
        ]
    return texts
