"""A tiny model directory with a real tokenizer, built in seconds, for the evaluation tests."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_CACHE: dict[tuple[str, int], Path] = {}

CORPUS = (
    "The cat sat on the mat. The dog ran in the park. A bird sang in the tree.\n"
    "Spam offers win free money now. Meeting moved to Tuesday at noon. Great movie, I loved it.\n"
    "Terrible film, a waste of time. The quick brown fox jumps over the lazy dog.\n"
) * 20


def make_tokenizer(tmp: Path):
    from yunque.tokenizer import train_bpe

    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    return train_bpe([corpus], vocab_size=320, out_dir=tmp / "tok")


def make_model_dir(tmp: Path, family: str = "llama", seed: int = 0) -> Path:
    """An HF-format model dir (random tiny weights + our BPE tokenizer), loadable by yunque and transformers."""
    from hf_models import tiny_hf_model

    tok = make_tokenizer(tmp)
    out = tmp / f"model-{family}-{seed}"
    model = tiny_hf_model(family, seed=seed, vocab_size=tok.vocab_size)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_id, tok.eos_id
    model.config.pad_token_id = tok.pad_id
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save(out)
    return out


def cached_model_dir(family: str = "llama", seed: int = 0) -> Path:
    """One shared, read-only model dir per (family, seed) for the whole test session."""
    if (family, seed) not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix="yunque-eval-"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE[family, seed] = make_model_dir(root, family, seed)
    return _CACHE[family, seed]
