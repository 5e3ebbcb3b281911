"""The tokenizer a GGUF file describes, rebuilt as Hugging Face tokenizer files (and written back, on export).

A GGUF carries no tokenizer.json: it stores the vocabulary, merges, token types and special
ids under llama.cpp's keys, and names the pre-tokenizer (`tokenizer.ggml.pre`) that llama.cpp
hard-codes per model family. Two vocabularies are rebuilt with the `tokenizers` library:

- `gpt2`: byte-level BPE. The vocabulary and merges are the file's; the split before the
  byte-level step is the one llama.cpp applies for the `pre` name (SmolLM's `smollm` splits
  every digit off first, Llama 3 and Qwen2 have their own regexes).
- `llama`: SentencePiece-style BPE with byte fallback; merges come from the vocabulary and its
  scores (a SentencePiece BPE merges the pair whose result scores highest), and a "▁" is
  prepended to the text and after each special token, as llama.cpp and the original
  checkpoints do.

Token types say which tokens are special (control, unknown) or added (user-defined); every
token keeps its id in the file.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from yunque.errors import CheckpointError, YunqueError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
# llama.cpp's splits (llama-vocab.cpp), in the form of the models' own tokenizer.json files.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# pre name -> (regex split before the byte-level step or None, split digits first, byte-level uses GPT-2's regex,
# ignore_merges: a pre-token that is itself in the vocabulary stays whole, as llama.cpp does for Llama 3)
PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool, bool]] = {
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), (None, False, True, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), (None, True, True, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), (_LLAMA3, False, False, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), (_LLAMA3, False, False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2, False, False, False)),
}
TOKENIZER_MODELS = ("gpt2", "llama")


def _array(meta: dict, key: str, kind: type, n: int | None, path) -> list | None:
    value = meta.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or (n is not None and len(value) != n)
        or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    ):
        want = f"{n} " if n is not None else ""
        raise CheckpointError(f"{path}: metadata {key}: expected a list of {want}{kind.__name__} values")
    return value


def _byte_level(meta: dict, tokens: list[str], path) -> RustTokenizer:
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    split, digits, gpt2_regex, ignore_merges = PRE_TOKENIZERS[pre]
    raw = _array(meta, "tokenizer.ggml.merges", str, None, path) or []
    merges = []
    for i, m in enumerate(raw):
        parts = m.split(" ")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{path}: tokenizer.ggml.merges[{i}] {m!r} is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    rust = RustTokenizer(_bpe(path, vocab=_vocab(tokens, path), merges=merges, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=gpt2_regex))
    rust.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    rust.decoder = decoders.ByteLevel()
    return rust


def _sentencepiece(meta: dict, tokens: list[str], types: list[int], path) -> RustTokenizer:
    scores = _array(meta, "tokenizer.ggml.scores", float, len(tokens), path)
    if scores is None:
        raise CheckpointError(f"{path}: metadata tokenizer.ggml.scores is missing (a llama vocabulary needs it)")
    vocab = _vocab(tokens, path)
    normal = {t for t, kind in zip(tokens, types, strict=True) if kind == NORMAL}
    found = []
    for t, score in zip(tokens, scores, strict=True):
        if t in normal:
            found += [(score, i, t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in normal and t[i:] in normal]
    # Highest-scoring result first; for one result, the longest left piece first.
    found.sort(key=lambda m: (-m[0], -m[1]))
    unk = next((t for t, kind in zip(tokens, types, strict=True) if kind == UNKNOWN), None)
    rust = RustTokenizer(
        _bpe(path, vocab=vocab, merges=[(m[2], m[3]) for m in found], unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    rust.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="always" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    rust.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return rust


def _bpe(path, **kw) -> models.BPE:
    try:
        return models.BPE(**kw)
    except Exception as e:  # noqa: BLE001  (the Rust side reports a merge of unknown tokens as a bare Exception)
        raise CheckpointError(f"{path}: inconsistent tokenizer vocabulary ({e})") from None


def _vocab(tokens: list[str], path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise CheckpointError(f"{path}: tokenizer.ggml.tokens[{i}] {t!r} repeats token {vocab[t]}")
        vocab[t] = i
    return vocab


def build_tokenizer(meta: dict, path) -> tuple[RustTokenizer, dict[str, Any]]:
    """(the tokenizer, tokenizer_config.json) the metadata describes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise CheckpointError(f"{path}: the file has no tokenizer (metadata tokenizer.ggml.model is missing)")
    if kind not in TOKENIZER_MODELS:
        raise CheckpointError(
            f"{path}: tokenizer model {kind!r} is not supported (supported: {', '.join(TOKENIZER_MODELS)})"
        )
    tokens = _array(meta, "tokenizer.ggml.tokens", str, None, path)
    if not tokens:
        raise CheckpointError(f"{path}: metadata tokenizer.ggml.tokens is missing or empty")
    types = _array(meta, "tokenizer.ggml.token_type", int, len(tokens), path) or [NORMAL] * len(tokens)
    rust = _byte_level(meta, tokens, path) if kind == "gpt2" else _sentencepiece(meta, tokens, types, path)
    rust.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k in (CONTROL, UNKNOWN)
        ]
    )
    rust.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == USER_DEFINED
        ]
    )
    if rust.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(
            f"{path}: the rebuilt tokenizer has {rust.get_vocab_size(with_added_tokens=True)} "
            f"tokens, the file lists {len(tokens)}"
        )

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens) else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    # llama.cpp's defaults where the file does not say: BOS for SentencePiece vocabularies and Llama 3.
    add_bos = meta.get(
        "tokenizer.ggml.add_bos_token",
        kind == "llama" or meta.get("tokenizer.ggml.pre") in ("llama3", "llama-v3", "llama-bpe"),
    )
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    b = [bos] if add_bos and bos else []
    e = [eos] if add_eos and eos else []
    single, pair = [*b, "$A", *e], [*b, "$A", *e, *b, "$B:1", *e]
    pieces = [(t, tokens.index(t)) for t in dict.fromkeys(b + e)]
    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    if pieces:
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=pieces))
    if steps:
        rust.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
    added = {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(rust.get_added_tokens_decoder().items())
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(add_eos),
        "added_tokens_decoder": added,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
    }
    templates = chat_templates(meta, path)
    if templates:
        single_template = set(templates) == {"default"}
        config["chat_template"] = (
            templates["default"] if single_template else [{"name": k, "template": v} for k, v in templates.items()]
        )
    return rust, config


def chat_templates(meta: dict, path) -> dict[str, str]:
    """`tokenizer.chat_template`, and named ones (`tokenizer.chat_template.<name>`, e.g. tool_use)."""
    out: dict[str, str] = {}
    for key, value in meta.items():
        if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
            if not isinstance(value, str):
                raise CheckpointError(f"{path}: metadata {key} is not a string")
            out["default" if key == "tokenizer.chat_template" else key.removeprefix("tokenizer.chat_template.")] = value
    return out


def tokenizer_files(meta: dict, cfg: dict, path) -> dict[str, str]:
    """File name -> content: tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json.

    The tokenizer is loaded back through yunque's Tokenizer before anything is written, so a file
    that yields a tokenizer yunque refuses fails here, naming the GGUF file."""
    from yunque.tokenizer import Tokenizer

    rust, config = build_tokenizer(meta, path)
    config["model_max_length"] = cfg["max_position_embeddings"]
    templates = chat_templates(meta, path)
    eog = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eog = [i for i in eog if isinstance(i, int) and 0 <= i < len(meta["tokenizer.ggml.tokens"])]
    try:
        tok = Tokenizer(rust, config, templates, eog, source=str(path))
    except YunqueError as e:
        raise CheckpointError(f"{path}: the tokenizer it describes is unusable: {e}") from None
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
    gen: dict[str, Any] = {
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": tok.stop_ids[0] if len(tok.stop_ids) == 1 else tok.stop_ids,
    }
    if cfg.get("pad_token_id") is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]

    def dump(obj) -> str:
        return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"

    return {
        "tokenizer.json": rust.to_str(),
        "tokenizer_config.json": dump(config),
        "special_tokens_map.json": dump(specials),
        "generation_config.json": dump(gen),
    }


# -- writing (yunque export --format gguf) -------------------------------------------------------
# For a split that several names share, the name llama.cpp's converter writes for the family that
# uses it (Llama 3: llama-bpe); any other name with the same split is what llama.cpp runs the same way.
_WRITTEN_PRE = ("llama-bpe", "qwen2", "smollm", "gpt-2", "smaug-bpe")


def pre_tokenizer_name(data: dict, source) -> str:
    """The `tokenizer.ggml.pre` whose split llama.cpp applies for a byte-level BPE tokenizer.json
    (parsed); a vocabulary llama.cpp would split otherwise is refused, naming what differs."""
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise CheckpointError(
            f"{source}: not a byte-level BPE tokenizer (a SentencePiece-style vocabulary?); "
            "GGUF export writes gpt2 (byte-level BPE) vocabularies only"
        )
    normalizer = data.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":  # NFC: llama.cpp's converter drops it too (Qwen2)
        raise CheckpointError(f"{source}: normalizer {normalizer.get('type')!r}: llama.cpp applies none")
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split, digits, gpt2_regex = None, False, None
    for i, step in enumerate(steps):
        kind, pattern = step.get("type"), step.get("pattern") or {}
        if kind == "Digits" and step.get("individual_digits") and i == 0:
            digits = True
        elif kind == "Split" and split is None and step.get("behavior") == "Isolated" and not step.get("invert"):
            split = pattern.get("Regex")
        elif kind == "ByteLevel" and i == len(steps) - 1 and not step.get("add_prefix_space"):
            gpt2_regex = step.get("use_regex", True)
        else:
            split = gpt2_regex = None
            break
    signature = (split, digits, gpt2_regex, bool(model.get("ignore_merges")))
    for name in (*_WRITTEN_PRE, *PRE_TOKENIZERS):
        if PRE_TOKENIZERS[name] == signature:
            return name
    raise CheckpointError(
        f"{source}: its pre-tokenizer ({json.dumps(pre)[:200]}) is none that llama.cpp implements "
        f"(known: {', '.join(sorted(PRE_TOKENIZERS))})"
    )


def add_tokenizer(writer, tok, n_vocab: int, pad_id: int | None, recorded_pre: str | None, source) -> str:
    """Write `tok`'s (a yunque Tokenizer's) vocabulary as llama.cpp's converter writes a gpt2 one:
    tokens by id ([PADn] where the embedding has rows no token names), token types, merges, special
    ids, add_bos/add_eos and the chat templates. `recorded_pre`: the name an import recorded, kept when
    it names the same split (what came in goes out). Returns the pre-tokenizer name written."""
    rust = tok._rust
    data = json.loads(rust.to_str())
    pre = pre_tokenizer_name(data, source)
    model = data["model"]
    if recorded_pre in PRE_TOKENIZERS and PRE_TOKENIZERS[recorded_pre] == PRE_TOKENIZERS[pre]:
        pre = recorded_pre
    ids = rust.get_vocab(with_added_tokens=True).values()
    if max(ids, default=-1) >= n_vocab:
        raise CheckpointError(
            f"{source}: the tokenizer has token id {max(ids)}, the model's embedding only {n_vocab} rows"
        )
    added = rust.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n_vocab):
        t = rust.id_to_token(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(t)
            types.append(NORMAL)
    # Spaces inside a merge's parts are written as the byte-level alphabet's space (gguf's SpecialVocab does so too).
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    named = {k: rust.token_to_id(v) for k, v in tok.special_tokens.items()}
    specials = {
        "bos": tok.bos_id,
        "eos": tok.eos_id,
        "unk": named.get("unk_token"),
        "pad": named.get("pad_token", pad_id),
    }
    if tok.eot_id is not None and tok.eot_id != tok.eos_id:  # llama.cpp stops there too
        specials["eot"] = tok.eot_id
    for kind, i in specials.items():
        if isinstance(i, int) and 0 <= i < n_vocab:
            getattr(writer, f"add_{kind}_token_id")(i)
    # What the post-processor adds, found by running it: llama.cpp can add a BOS and an EOS, nothing else.
    plain = rust.encode("a", add_special_tokens=False).ids
    full = rust.encode("a", add_special_tokens=True).ids
    add_bos = len(full) > len(plain) and full[0] == tok.bos_id
    add_eos = len(full) > len(plain) + add_bos and full[-1] == tok.eos_id
    if full != [tok.bos_id] * add_bos + plain + [tok.eos_id] * add_eos:
        raise CheckpointError(
            f"{source}: its post-processor adds {[rust.id_to_token(i) for i in full]} around 'a'; "
            "llama.cpp can only add the BOS and EOS tokens"
        )
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    templates = dict(tok.chat_templates)
    if templates:
        named_templates = [{"name": k, "template": v} for k, v in templates.items()]
        writer.add_chat_template(templates["default"] if set(templates) == {"default"} else named_templates)
    return pre
