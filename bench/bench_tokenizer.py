"""Tokenizer and chat-template throughput: training, single vs batch encoding, chat rendering.

    PYTHONPATH=. python bench/bench_tokenizer.py [--mb 20] [--vocab 8192]

The corpus is synthetic (mixed English/Spanish/Chinese/code/emoji, generated here) so the
figures are about the machinery, not about compression on real text. Prints ratios against
transformers when it is installed.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from yunque.chat import render_chat, render_chats
from yunque.tokenizer import train_bpe

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "el la de que y en los se del las un por con una para es al lo como más pero sus le ya o fue este "
    "我们 学习 机器 世界 今天 天气 北京 数据 模型 训练 🙂 🚀 👍 def return class import self None True "
    "x = y + 1 ( ) [ ] { } : ; , . ! ? — « » niño canción pingüino acción"
).split()


SYLLABLES = "ka lo mi ne su ta ri po ña ción der ing tion ber ster ment ly pre con 学 习 机 器 数 据".split()


def make_corpus(path: Path, mb: float, seed: int = 0) -> Path:
    rng = random.Random(seed)
    # Real words plus 20k pseudo-words drawn Zipf-like, so a large vocabulary has something to learn.
    pseudo = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    weights = [1 / (i + 1) for i in range(len(pseudo))]
    target = int(mb * 1e6)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            n = rng.randint(5, 40)
            words = rng.choices(WORDS, k=n // 2) + rng.choices(pseudo, weights, k=n - n // 2)
            rng.shuffle(words)
            line = " ".join(words) + rng.choice(["\n", "\n\n", "\n    "])
            f.write(line)
            written += len(line.encode("utf-8"))
    return path


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--docs", type=int, default=20000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    corpus = make_corpus(tmp / "corpus.txt", args.mb)

    t0 = time.perf_counter()
    tok = train_bpe([corpus], vocab_size=args.vocab, out_dir=tmp / "tok")
    dt = time.perf_counter() - t0
    print(f"train: {args.mb:.0f} MB, vocab {tok.vocab_size} in {dt:.1f} s ({args.mb / dt:.1f} MB/s)")

    lines = corpus.read_text(encoding="utf-8").splitlines()
    rng = random.Random(1)
    docs = ["\n".join(rng.choice(lines) for _ in range(8)) for _ in range(args.docs)]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    loop = timed(lambda: [tok.encode(d) for d in docs])
    batch = timed(lambda: tok.encode_batch(docs))
    n_tok = sum(map(len, tok.encode_batch(docs)))
    print(
        f"encode {args.docs} docs ({n_bytes / 1e6:.1f} MB, {n_tok / 1e6:.2f} M tokens, {n_bytes / n_tok:.2f} bytes/token)"  # noqa: E501
    )
    print(f"  encode() loop : {n_tok / loop / 1e6:.2f} M tok/s")
    print(f"  encode_batch(): {n_tok / batch / 1e6:.2f} M tok/s  ({loop / batch:.1f}x the loop)")
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tmp / "tok"))
        hf_t = timed(lambda: hf(docs, add_special_tokens=False)["input_ids"])
        print(f"  transformers batch call: {n_tok / hf_t / 1e6:.2f} M tok/s  (encode_batch is {hf_t / batch:.1f}x)")
    except ImportError:
        hf = None

    chats = [
        [{"role": "system", "content": "Be brief."}]
        + [{"role": r, "content": rng.choice(lines)} for _ in range(3) for r in ("user", "assistant")]
        for _ in range(2000)
    ]
    ours = timed(lambda: [render_chat(tok, c) for c in chats], repeat=1)
    print(f"render_chat (7 messages, ids + assistant mask): {len(chats) / ours:.0f} chats/s")
    ours_b = timed(lambda: render_chats(tok, chats), repeat=1)
    print(f"render_chats (batch): {len(chats) / ours_b:.0f} chats/s")
    if hf is not None:
        theirs = timed(lambda: [hf.apply_chat_template(c, return_dict=True)["input_ids"] for c in chats], repeat=1)
        print(f"  transformers apply_chat_template (ids only): {len(chats) / theirs:.0f} chats/s")


if __name__ == "__main__":
    main()
