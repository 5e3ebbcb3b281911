"""Tokenize and pack prepared splits into memory-mapped token shards; read them back for training.

On-disk format (all little-endian, no headers, no pickle), under `<data dir>/tokens/`:

    meta.json             {"format": "yunque-tokens/1", "dtype": "uint16"|"uint32", "vocab_size",
                           "bos_id", "eos_id", "pad_id", "splits": {split: {"documents", "tokens",
                           "trained_tokens"}}}
    <split>.tokens.bin    token ids, `dtype` (uint16 when vocab_size <= 65536, else uint32)
    <split>.mask.bin      uint8, one per token: 1 where the token is a training target
                          (the model is trained to predict it from the tokens before it)
    <split>.docs.bin      int64, n_documents + 1 offsets into the token arrays; document i is
                          tokens[docs[i]:docs[i+1]], docs[0] = 0, docs[-1] = n_tokens

plus `<data dir>/tokenizer/`, a copy of the tokenizer the shards were made with (training
must use the same one). Documents are stored back to back in record order, each one whole:
a trainer packs sequences across documents and uses the offsets to stop attention crossing
a boundary (block-diagonal mask or per-document position ids).

Each record is rendered by `yunque.data.encode` (the rendering training uses for records too):
chat through the tokenizer's chat template with only assistant turns (and their end-of-turn token)
as targets; completion and classification as BOS + prompt + answer + EOS with the answer and EOS as
targets; text as BOS + text + EOS with everything after BOS as targets.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from yunque.data.split import SPLITS
from yunque.errors import DataError

FORMAT = "yunque-tokens/1"
_STATE: dict[str, Any] = {}


def _init(tok_dir: str) -> None:
    from yunque.tokenizer import Tokenizer

    _STATE["tok"] = Tokenizer.from_dir(tok_dir)


def _render_chunk(lines: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    from yunque.data.encode import encode
    from yunque.errors import YunqueError

    tok = _STATE["tok"]
    out = []
    for line in lines:
        rec = json.loads(line)
        try:
            ids, mask = encode(tok, rec)
        except YunqueError as e:
            raise DataError(f"{rec.get('source', 'a record')}: {e}") from None
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)))
    return out


def write_shards(data_dir: Path, tok_dir: Path, workers: int = 1, chunk: int = 256) -> dict[str, Any]:
    """Tokenize every split JSONL in `data_dir` into tokens/; returns the totals (also in meta.json)."""
    from yunque.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tdir = data_dir / "tokens"
    tdir.mkdir(exist_ok=True)
    shutil.copytree(tok_dir, data_dir / "tokenizer", dirs_exist_ok=True)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "splits": {},
    }
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, initializer=_init, initargs=(str(tok_dir),)) if workers > 1 else None
    if pool is None:
        _init(str(tok_dir))
    try:
        for split in SPLITS:
            meta["splits"][split] = _write_split(data_dir, tdir, split, dtype, pool, chunk)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    (tdir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _write_split(data_dir: Path, tdir: Path, split: str, dtype, pool, chunk: int) -> dict[str, int]:
    n_docs = n_tok = n_train = 0
    with (
        open(data_dir / f"{split}.jsonl", "rb") as src,
        open(tdir / f"{split}.tokens.bin", "wb") as ft,
        open(tdir / f"{split}.mask.bin", "wb") as fm,
        open(tdir / f"{split}.docs.bin", "wb") as fd,
    ):
        fd.write(np.zeros(1, dtype=np.int64).tobytes())
        chunks = iter(lambda: list(itertools.islice(src, chunk)), [])
        results = pool.imap(_render_chunk, chunks) if pool is not None else map(_render_chunk, chunks)
        for res in results:
            offs = []
            for ids, mask in res:
                ft.write(ids.astype(dtype).tobytes())
                fm.write(mask.tobytes())
                n_tok += len(ids)
                n_train += int(mask.sum())
                n_docs += 1
                offs.append(n_tok)
            fd.write(np.asarray(offs, dtype=np.int64).tobytes())
    return {"documents": n_docs, "tokens": n_tok, "trained_tokens": n_train}


class TokenShards:
    """Read-only view of one split's token shard, memory-mapped (nothing is loaded up front).

        ds = TokenShards("data/", "train")
        ds.tokens[i:j], ds.loss_mask[i:j]     # np.memmap, dtype uint16/uint32 and uint8
        ds.doc_offsets                        # int64 starts of every document, plus the end
        len(ds), ds.doc(i)                    # number of documents; (tokens, mask) of document i

    Run `yunque.data.pipeline.verify(dir)` first to prove the files are the prepared ones.
    """

    def __init__(self, data_dir: str | Path, split: str):
        tdir = Path(data_dir) / "tokens"
        mpath = tdir / "meta.json"
        try:
            meta = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise DataError(f"{mpath}: cannot read token shard metadata: {str(e) or 'nested too deeply'}") from None
        splits = meta.get("splits") if isinstance(meta, dict) else None
        if not isinstance(splits, dict) or meta.get("format") != FORMAT or split not in splits:
            raise DataError(f"{tdir}: no {FORMAT} shard for split {split!r}")
        self.meta = meta
        self.split = split
        info = splits[split]
        if meta.get("dtype") not in ("uint16", "uint32"):  # np.dtype() of a file's string could be anything
            raise DataError(f"{mpath}: dtype {str(meta.get('dtype'))[:40]!r} is not uint16 or uint32")
        if not (
            isinstance(info, dict)
            and all(
                isinstance(info.get(k), int) and not isinstance(info.get(k), bool) and info[k] >= 0
                for k in ("documents", "tokens")
            )
        ):
            raise DataError(f"{mpath}: splits.{split} needs non-negative integers documents and tokens")
        dtype = np.dtype(meta["dtype"])
        self.tokens = _memmap(tdir / f"{split}.tokens.bin", dtype, info["tokens"])
        self.loss_mask = _memmap(tdir / f"{split}.mask.bin", np.dtype(np.uint8), info["tokens"])
        self.doc_offsets = _memmap(tdir / f"{split}.docs.bin", np.dtype(np.int64), info["documents"] + 1)
        offs = np.asarray(self.doc_offsets)
        if len(offs) and (offs[0] != 0 or offs[-1] != info["tokens"] or (np.diff(offs) < 0).any()):
            raise DataError(
                f"{tdir / f'{split}.docs.bin'}: document offsets must rise from 0 to {info['tokens']} "
                "(the file is corrupt or does not belong to these tokens)"
            )

    def __len__(self) -> int:
        return len(self.doc_offsets) - 1

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])
        return self.tokens[a:b], self.loss_mask[a:b]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self.doc(i) for i in range(len(self)))


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise DataError(f"{path}: {size} bytes, expected {count} x {dtype.itemsize} (truncated or wrong file)")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def render_examples(data_dir: Path, n: int = 3, split: str = "train") -> str:
    """The first `n` documents decoded, with non-target (masked) spans shown in ⟦…⟧, plus length stats."""
    from yunque.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(data_dir / "tokenizer")
    ds = TokenShards(data_dir, split)
    lens = np.diff(np.asarray(ds.doc_offsets))
    info = ds.meta["splits"][split]
    lines = [f"tokens ({split}): {info['tokens']} total, {info['trained_tokens']} trained, {len(ds)} documents"]
    if len(lens):
        lines.append(
            f"document length: min {lens.min()}, median {int(np.median(lens))}, "
            f"p95 {int(np.percentile(lens, 95))}, max {lens.max()}"
        )
    lines.append("examples (⟦masked: not trained⟧, plain: trained):")
    for i in range(min(n, len(ds))):
        ids, mask = ds.doc(i)
        parts = []
        for m, group in itertools.groupby(zip(ids.tolist(), mask.tolist()), key=lambda x: x[1]):
            text = tok.decode([t for t, _ in group])
            parts.append(text if m else f"⟦{text}⟧")
        lines.append(f"--- document {i} ---\n" + "".join(parts))
    return "\n".join(lines)
