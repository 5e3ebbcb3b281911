"""`logprobs` in OpenAI's two shapes, from the engine's ("logprobs", id, logprob, top) events.

The values are the log-softmax of the model's own logits at each step: before penalties,
temperature and top-p, so they describe the model, not the sampler (as OpenAI's do). The
sampled token comes first; `top` holds the most likely tokens, best first. A token's `bytes`
are its exact UTF-8 bytes, also when it holds only part of a character (then its `token`
text shows U+FFFD).

With the output guard on, token strings would carry what the guard redacts from the text
(an e-mail address, a key), so a choice's logprobs are released only once its text has
passed the guard whole (at its end, when streaming) and not at all when the guard redacted
anything in that choice.
"""

from __future__ import annotations

import re

Entry = tuple  # (token id, logprob, [(id, logprob), ...])


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes (GPT-2's table), reversed."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _gpt2_byte_decoder()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


class TokenTexts:
    """Token id -> (text, UTF-8 bytes), cached: the same few thousand ids come back all the time."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, i: int) -> tuple[str, bytes]:
        hit = self._cache.get(i)
        if hit is None:
            text = self.tok.decode([i])
            raw = text.encode("utf-8")
            if "\ufffd" in text:  # part of a character: the bytes from the vocabulary entry
                piece = self.tok.id_to_token(i) or ""
                m = _BYTE_TOKEN.fullmatch(piece)
                if m:
                    raw = bytes([int(m.group(1), 16)])
                elif piece and all(c in _BYTES for c in piece):
                    raw = bytes(_BYTES[c] for c in piece)
            hit = self._cache[i] = (text, raw)
        return hit


def chat(entries: list[Entry], texts: TokenTexts) -> dict:
    """A chat choice's (or chunk's) `logprobs`: {"content": [...], "refusal": None}."""

    def one(i: int, lp: float) -> dict:
        text, raw = texts(i)
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {
        "content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in entries],
        "refusal": None,
    }


def completion(entries: list[Entry], texts: TokenTexts, offset: int = 0) -> dict:
    """A completion choice's (or chunk's) `logprobs`; `offset`: characters of the choice's text before them."""
    tokens = [texts(t)[0] for t, _, _ in entries]
    starts = []
    for tok in tokens:
        starts.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [_by_text(top, texts) for _, _, top in entries],
        "text_offset": starts,
    }


def _by_text(top: list[tuple[int, float]], texts: TokenTexts) -> dict[str, float]:
    """The legacy shape keys alternatives by text; where two tokens read the same (parts of one
    character both read U+FFFD), the more likely one keeps the key."""
    out: dict[str, float] = {}
    for i, v in top:
        out.setdefault(texts(i)[0], v)
    return out
