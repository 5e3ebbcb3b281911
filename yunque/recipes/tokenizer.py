"""`yunque tokenizer train`: a byte-level BPE tokenizer from your own text."""

from __future__ import annotations

import time
from pathlib import Path

from yunque.errors import YunqueError
from yunque.textstream import corpus_files, iter_corpus
from yunque.tokenizer import SPECIAL_TOKENS, train_bpe

_SAMPLE_CHARS = 1 << 20


def train_cmd(
    files: list[Path], *, out: Path, vocab_size: int = 8192, min_frequency: int = 2, overwrite: bool = False
) -> None:
    """Train a Llama-3-style byte-level BPE tokenizer (with chat template) on text files.

    Args:
        files: UTF-8 text files; .jsonl files contribute the "text" field of each line
        out: output directory, written in Hugging Face format
        vocab_size: total vocabulary size, special tokens included
        min_frequency: least number of times a pair must occur to be merged
        overwrite: replace a tokenizer that already exists in --out
    """
    if (Path(out) / "tokenizer.json").exists() and not overwrite:
        raise YunqueError(
            f"{out}: already holds a tokenizer.json (a model's embeddings may depend on it); pass --overwrite to replace it"  # noqa: E501
        )
    paths = corpus_files(files)
    t0 = time.perf_counter()
    tok = train_bpe(paths, vocab_size=vocab_size, out_dir=out, min_frequency=min_frequency)
    elapsed = time.perf_counter() - t0
    sample, n = [], 0
    for text in iter_corpus(paths):  # compression on the corpus head: a quick sanity figure
        sample.append(text)
        n += len(text)
        if n >= _SAMPLE_CHARS:
            break
    sample_text = "".join(sample)[:_SAMPLE_CHARS]
    n_tokens = max(len(tok.encode(sample_text)), 1)
    size = sum(p.stat().st_size for p in paths)
    short = f" (requested {vocab_size}: the corpus has too few distinct pairs)" if tok.vocab_size < vocab_size else ""
    print(f"trained byte-level BPE on {len(paths)} file(s), {size / 1e6:.1f} MB, in {elapsed:.1f} s")
    print(
        f"vocab size {tok.vocab_size}{short}, {len(SPECIAL_TOKENS)} special tokens, pad {tok.pad_id}, stop ids {tok.stop_ids}"  # noqa: E501
    )
    print(f"{len(sample_text.encode('utf-8')) / n_tokens:.2f} bytes/token on the first {len(sample_text):,} characters")
    print(f"saved to {out}")
