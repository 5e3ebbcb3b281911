"""Shared test data for the tokenizer and chat tests: a small mixed-language corpus, one
trained tokenizer per session, and HF-format directories for other model families."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer

from yunque.tokenizer import train_bpe

MIXED = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see.",
    "El niño comió pingüino y jalapeño en la mañana; ¿qué pasó? ¡Olé! Acción, canción.",
    "我们在北京学习机器学习。你好，世界！今天天气很好。",
    "Emoji: 🙂🚀👩‍💻 🇪🇸 ok 😀😀😀",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass X:\n\tpass\n",
    "spaces:" + " " * 40 + "end\n\n\n\n  \t \r\nline   \n",
    "numbers 1234567 3.14159 0x1F 2,000,000",
    "unseen scripts: Привет мир, مرحبا, 안녕하세요, e\u0301 \u00a0nbsp",
]
VOCAB = 700
_cache: dict[str, Path] = {}


def write_corpus(path: Path, n_lines: int = 2500, seed: int = 0) -> Path:
    """~200 KB of shuffled fragments of MIXED, so every script and whitespace shape is seen."""
    rng = random.Random(seed)
    words = [w for line in MIXED[:-1] for w in line.replace("\n", " ").split(" ") if w]
    syllables = [
        "ka",
        "lo",
        "mi",
        "ne",
        "su",
        "ta",
        "ri",
        "po",
        "ña",
        "ción",
        "der",
        "ing",
        "tion",
        "学",
        "习",
        "机",
        "器",
        "🙂",
    ]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n_lines):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))))
            f.write(rng.choice(["\n", "\n", "\n\n", "\n    ", "  \n\t", ". "]))
            if i % 50 == 0:
                f.write(rng.choice(MIXED[:-1]))
    return path


def trained_dir(root: Path) -> Path:
    """One trained Llama-3-style tokenizer per test session."""
    if "llama3" not in _cache:
        corpus = write_corpus(root / "corpus.txt")
        train_bpe([corpus], vocab_size=VOCAB, out_dir=root / "llama3")
        _cache["llama3"] = root / "llama3"
    return _cache["llama3"]


def family_dir(
    base: Path,
    out: Path,
    *,
    specials: list[str] = (),
    config: dict,
    template: str | None,
    generation_eos: list[str] | None = None,
) -> Path:
    """An HF tokenizer dir for another model family: the trained BPE plus that family's
    special tokens, tokenizer_config.json and (optionally) generation_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    rust = RustTokenizer.from_file(str(base / "tokenizer.json"))
    rust.add_special_tokens(list(specials))
    rust.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}
    if template is not None:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    if generation_eos is not None:
        ids = [rust.token_to_id(t) for t in generation_eos]
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}), encoding="utf-8")
    return out
