"""Tiny GGUF files written by the tests themselves with `gguf.GGUFWriter`, as llama.cpp's converter
would write them: its tensor names (from gguf's own name map), q/k rows permuted for llama, and
a byte-level BPE vocabulary trained here. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Where the fp16 scales sit in each k-quant block (ggml's block_q*_K layouts), so random blocks dequantise finite.
KQUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
_vocab_cache: dict[tuple, tuple] = {}


def bpe_vocab(pre: str, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE trained on a mixed-language corpus, split
    the way the `pre` name says; ids 0-2 are the ChatML special tokens."""
    key = (pre, vocab_size)
    if key in _vocab_cache:
        return _vocab_cache[key]
    from tok_helpers import MIXED
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from yunque.formats.gguf_tokenizer import PRE_TOKENIZERS

    split, digits, gpt2_regex, _ = PRE_TOKENIZERS[pre]
    tok = Tokenizer(models.BPE())
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(MIXED * 20, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    _vocab_cache[key] = tokens, types, merges
    return tokens, types, merges


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: each head's rotate-half rows become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize(w: np.ndarray, qtype: str, rng: np.random.Generator):
    """(array for GGUFWriter.add_tensor, raw_dtype)."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    if qtype not in KQUANT_SCALES:
        try:
            return gguf.quants.quantize(w.astype(np.float32), q), q
        except NotImplementedError:
            pass
    # gguf-py cannot quantise these: random blocks, with small finite scales where the layout is known
    block, size = gguf.GGML_QUANT_SIZES[q]
    blocks = rng.integers(0, 256, (w.size // block, size), dtype=np.uint8)
    for off in KQUANT_SCALES.get(qtype, ()):
        blocks[:, off : off + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return blocks.reshape(w.shape[0], -1), q


def write_gguf(
    path: Path,
    hf_model,
    *,
    arch: str = "llama",
    qtype="F16",
    pre: str = "smollm",
    name: str = "Tiny",
    meta: dict | None = None,
    skip: tuple[str, ...] = (),
    extra: dict | None = None,
    tokens: tuple | None = None,
    seed: int = 0,
) -> Path:
    """`hf_model` (a transformers Llama/Qwen2 model) as a GGUF file; 2-D weights in `qtype` (or
    `qtype(gguf_name, array)`), norms in F32. `meta` overrides or adds metadata keys ({key: None}
    drops one); `skip` leaves tensors out; `extra` adds tensors (GGUF name -> tensor, in F32)."""
    import gguf

    cfg = hf_model.config
    rng = np.random.default_rng(seed)
    toks, types, merges = tokens or bpe_vocab(pre, cfg.vocab_size)
    w = gguf.GGUFWriter(str(path), (meta or {}).get("general.architecture", arch))
    kv: dict = {
        "general.name": name,
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch}.rope.freq_base": float(
            cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
        ),
        f"{arch}.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": list(toks),
        "tokenizer.ggml.token_type": list(types),
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }
    kv.update(meta or {})
    for key, value in kv.items():
        if key == "general.architecture" or value is None:
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers
    )
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, t in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        gname = f"{names.get_name(base)}.{suffix}"
        if gname in skip:
            continue
        a = t.detach().float().numpy()
        if arch == "llama" and ".attn_q." in gname:
            a = _llama_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gname:
            a = _llama_permute(a, cfg.num_key_value_heads)
        kind = qtype(gname, a) if callable(qtype) else qtype if a.ndim == 2 else "F32"
        data, raw = quantize(a, kind, rng)
        w.add_tensor(gname, data, raw_dtype=raw)
    for gname, t in (extra or {}).items():
        w.add_tensor(gname, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_tiny(
    arch: str = "llama",
    *,
    vocab_size: int,
    hidden: int = 64,
    ffn: int = 160,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = False,
    seed: int = 0,
):
    """A random transformers Llama (GQA) or Qwen2 (q/k/v bias) model with perturbed norms and biases."""
    import transformers

    cls, cfg_cls = (
        (transformers.LlamaForCausalLM, transformers.LlamaConfig)
        if arch == "llama"
        else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)
    )
    cfg = cfg_cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def sp_vocab(vocab_size: int) -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) of a SentencePiece-style BPE vocabulary as llama.cpp stores
    Llama 2's: <unk>, <s>, </s>, 256 byte tokens, then pieces scored by merge order."""
    key = ("sp", vocab_size)
    if key in _vocab_cache:
        return _vocab_cache[key]
    from tok_helpers import MIXED
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    n_chars = len({c for s in MIXED for c in s.replace(" ", "\u2581")})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False, limit_alphabet=n_chars)
    tok.train_from_iterator(MIXED * 20, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    rank = {("".join(m) if isinstance(m, list) else m.replace(" ", "")): i for i, m in enumerate(model["merges"])}
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(rank.get(p, len(rank) + i)) for i, p in enumerate(pieces)]
    _vocab_cache[key] = tokens, types, scores
    return tokens, types, scores
