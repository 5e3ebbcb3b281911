"""Training documents from the data step's output or raw files: token ids + loss mask per document.

JSONL records (the data pipeline's normalised records, or any raw shape it reads: chat, alpaca,
completion, text, classification) are parsed by `yunque.data.records` and encoded by
`yunque.data.encode`, the same parser and rendering as the data step's token shards, and the
prompts evaluation uses:
    text            every token is trained
    completion      prompt masked, completion trained (+ EOS)
    chat            the chat template's assistant mask: assistant turns (tool calls too) and their
                    end-of-turn trained; system, user and tool-result turns not
    classification  text as the prompt, the label (after a space) as the completion
`data.train_on_prompt` trains on prompts / user turns too. Raw .txt files are one `text`
document each; `data.val_fraction` holds out the tail of raw text (e.g. the last 10%).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from yunque.data.encode import encode
from yunque.data.records import RecordError, parse
from yunque.errors import ConfigError, DataError, YunqueError
from yunque.tokenizer import Tokenizer
from yunque.train.config import TrainConfig
from yunque.train.packing import ArraySource


@dataclass
class TrainData:
    train: ArraySource
    val: ArraySource | None
    manifest: dict | None  # the verified data manifest's roots, for run.json


def verify_prepared(d: Path) -> dict:
    """The data pipeline's verification (raises DataError naming file and record)."""
    try:
        from yunque.data.pipeline import verify
    except ImportError:
        raise DataError(
            f"{d}: cannot verify the manifest: yunque.data.pipeline is not installed "
            "(pass --no-verify-data to train without verification)"
        ) from None
    return verify(d)


def _manifest_roots(d: Path) -> dict | None:
    p = d / "manifest.json"
    if not p.is_file():
        return None
    raw = p.read_bytes()
    m = json.loads(raw)
    splits = m.get("splits", {})
    roots = {
        name: {k: v for k, v in info.items() if k in ("records", "merkle_root")}
        for name, info in splits.items()
        if isinstance(info, dict)
    }
    return {"manifest_sha256": hashlib.sha256(raw).hexdigest(), "splits": roots}


def resolve_tokenizer(cfg: TrainConfig) -> Path:
    """cfg.tokenizer, else the tokenizer the data step tokenized with, else the model directory's."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    if cfg.data.dir is not None and (cfg.data.dir / "tokenizer" / "tokenizer.json").is_file():
        return cfg.data.dir / "tokenizer"
    if cfg.model.path is not None:
        return cfg.model.path
    raise ConfigError("tokenizer: required (no data.dir/tokenizer and no model.path to take it from)")


def _shards(cfg: TrainConfig, tok_dir: Path) -> tuple[ArraySource, ArraySource | None]:
    """Pre-tokenized `tokens/` of a prepared directory, memory-mapped (the data step's TokenShards)."""
    from yunque.data.shards import TokenShards

    d = cfg.data.dir
    made_with = d / "tokenizer" / "tokenizer.json"
    if made_with.is_file() and (tok_dir / "tokenizer.json").read_bytes() != made_with.read_bytes():
        raise DataError(
            f"{d / 'tokens'}: tokenized with {made_with.parent}, not with the tokenizer {tok_dir}; "
            "train with that tokenizer or re-run the data step"
        )
    out = []
    for split in ("train", "val"):
        try:
            s = TokenShards(d, split)
        except DataError:
            if split == "train":
                raise
            out.append(None)
            continue
        out.append(ArraySource(s.tokens, np.asarray(s.doc_offsets), s.loss_mask) if len(s) else None)
    if out[0] is None:
        raise DataError(f"{d / 'tokens'}: the train split has no documents")
    return out[0], out[1]


class Encoder:
    def __init__(self, tok: Tokenizer, cfg: TrainConfig):
        self.tok, self.cfg = tok, cfg
        self.bos = [tok.bos_id] if cfg.data.add_bos and tok.bos_id is not None else []
        self.eos = [tok.eos_id] if cfg.data.add_eos and tok.eos_id is not None else []

    def text(self, text: str) -> tuple[list[int], None]:
        return self.bos + self.tok.encode(text) + self.eos, None

    def record(self, rec: dict) -> tuple[list[int], list[bool] | None]:
        """One normalised record (`records.parse`); plain text keeps the all-trained fast path."""
        if rec["kind"] == "text":
            return self.text(rec["text"])
        d = self.cfg.data
        return encode(self.tok, rec, bos=d.add_bos, eos=d.add_eos, train_on_prompt=d.train_on_prompt)


def _jsonl_docs(path: Path, enc: Encoder) -> list:
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON: {e.msg}") from None
            try:
                docs.append(enc.record(parse(rec)))
            except (RecordError, YunqueError) as e:  # YunqueError: the chat template cannot render it
                raise DataError(f"{path}:{i}: {e}") from None
    return docs


def _file_docs(path: Path, enc: Encoder, part: str, frac: float) -> list:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix == ".jsonl":
        docs = _jsonl_docs(path, enc)
        cut = int(round(len(docs) * (1 - frac)))
        return docs[:cut] if part == "train" else docs[cut:]
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * (1 - frac))
    piece = text[:cut] if part == "train" else text[cut:]
    return [enc.text(piece)] if piece else []


def _source(docs: list, what: str) -> ArraySource:
    docs = [d for d in docs if len(d[0]) > 1]
    if not docs:
        raise DataError(f"no {what} documents with at least two tokens")
    return ArraySource.from_docs(docs)


def load_data(cfg: TrainConfig, tok: Tokenizer) -> TrainData:
    enc = Encoder(tok, cfg)
    d = cfg.data
    manifest = None
    if d.dir is not None:
        if not d.dir.is_dir():
            raise DataError(f"{d.dir}: data directory not found")
        if cfg.verify_data:
            verify_prepared(d.dir)
        manifest = _manifest_roots(d.dir)
        if (d.dir / "tokens" / "meta.json").is_file():
            tr, va = _shards(cfg, resolve_tokenizer(cfg))
            _check_vocab(tr, tok, "train")
            return TrainData(tr, va, manifest)
        train = _jsonl_docs(d.dir / "train.jsonl", enc)
        val = _jsonl_docs(d.dir / "val.jsonl", enc) if (d.dir / "val.jsonl").is_file() else []
    else:
        train = [doc for p in d.train for doc in _file_docs(p, enc, "train", d.val_fraction)]
        val = [doc for p in d.val for doc in _file_docs(p, enc, "train", 0.0)]
        if d.val_fraction > 0:
            val += [doc for p in d.train for doc in _file_docs(p, enc, "val", d.val_fraction)]
    tr, va = _source(train, "training"), _source(val, "validation") if val else None
    _check_vocab(tr, tok, "train")
    return TrainData(tr, va, manifest)


def _check_vocab(src: ArraySource, tok: Tokenizer, name: str) -> None:
    top = int(src.tokens.max()) if len(src.tokens) else 0
    if top >= tok.vocab_size:
        raise DataError(f"{name} data has token id {top} >= the tokenizer's vocab_size {tok.vocab_size}")


def _byte_decoder() -> dict[str, int]:
    # GPT-2 / Llama 3 byte-level alphabet: every byte is one printable character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token stands for (0 for special tokens): the denominator of bits per byte."""
    table = _byte_decoder()
    special = set(tok._rust.get_added_tokens_decoder())
    out = np.zeros(tok.vocab_size, dtype=np.float32)
    for i in range(tok.vocab_size):
        if i in special:
            continue
        s = tok.id_to_token(i) or ""
        out[i] = len(s) if all(ch in table for ch in s) else len(tok.decode([i]).encode("utf-8"))
    return torch.from_numpy(out)
