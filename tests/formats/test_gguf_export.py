"""`yunque export --format gguf`: tiny Llama (GQA, tied and untied) and Qwen2 (q/k/v bias) models written
here, exported, and read back by yunque's importer and by transformers' own GGUF loader: the source's
logits (f32/f16 within 1e-3; q8_0/q4_0 measured), its tokenizer ids, and llama.cpp's metadata."""

import hashlib
import json
import shutil

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_files import CHATML, bpe_vocab, hf_tiny, sp_vocab, write_gguf  # noqa: E402
from tok_helpers import MIXED, trained_dir  # noqa: E402
from tokenizers import Tokenizer as RustTokenizer  # noqa: E402

from yunque.__main__ import main  # noqa: E402
from yunque.formats.gguf import import_gguf, open_gguf, read_metadata  # noqa: E402
from yunque.formats.gguf_export import tensor_type  # noqa: E402
from yunque.formats.hf import load_model, save_model  # noqa: E402
from yunque.inference import load_tokenizer  # noqa: E402
from yunque.model import ModelConfig, Transformer  # noqa: E402
from yunque.models import CATALOGUE, locate  # noqa: E402

# name -> (architecture, tied head, rows the embedding has beyond the tokenizer's tokens, tokenizer)
CASES = {
    "llama-gqa": ("LlamaForCausalLM", False, 0, "llama3"),
    "llama-tied": ("LlamaForCausalLM", True, 5, "llama3"),
    "qwen2-bias": ("Qwen2ForCausalLM", False, 0, "qwen2"),
}
NO_LLAMA_CPP = "llama-cpp-python is not installed (pip install llama-cpp-python)"
SCALE = 4.0  # weights x4 after init: logits of a few units, so 1e-3 is a real bound


def _qwen2_tokenizer(root):
    """An HF tokenizer directory with Qwen2's split, as `yunque import` writes one (no import record)."""
    from yunque.formats.gguf_tokenizer import tokenizer_files

    tokens, types, merges = bpe_vocab("qwen2", 400)
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }
    out = root / "qwen2-tok"
    out.mkdir()
    for name, text in tokenizer_files(meta, {"max_position_embeddings": 256, "bos_token_id": 1}, "qwen2").items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def make_model(root, name, tok_dir, *, arch="LlamaForCausalLM", tied=False, extra_rows=0, seed=0, **kw):
    """A random yunque model saved as an HF directory with the tokenizer files of `tok_dir`."""
    n_tok = RustTokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    cfg = ModelConfig(
        vocab_size=n_tok + extra_rows,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=arch == "Qwen2ForCausalLM",
        tie_word_embeddings=tied,
        architecture=arch,
        max_position_embeddings=256,
        **kw,
    )
    torch.manual_seed(seed)
    m = Transformer(cfg)
    m.init_weights()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(torch.randn_like(p) * 0.1) if n.endswith(("norm.weight", ".bias")) else p.mul_(SCALE)
    out = save_model(m, root / name)
    for f in tok_dir.iterdir():
        if f.is_file() and f.name != "generation_config.json":
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-export")
    toks = {"llama3": trained_dir(root), "qwen2": _qwen2_tokenizer(root)}
    return {
        case: make_model(root, case, toks[tok], arch=arch, tied=tied, extra_rows=extra)
        for case, (arch, tied, extra, tok) in CASES.items()
    }


def ids_for(src, n=24):
    tok = load_tokenizer(src)
    ids = tok.encode(" ".join(MIXED), add_special_tokens=True)[:n]
    return torch.tensor([ids, list(reversed(ids))])


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
        return (out.logits if hasattr(out, "logits") else out).float()


def export(src, out, kind, *extra):
    assert main(["export", str(src), "--format", "gguf", "--type", kind, "--out", str(out), *extra]) == 0
    return out


def hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def metadata(path):
    reader = open_gguf(path)
    return read_metadata(reader, path), {t.name: t.tensor_type.name for t in reader.tensors}


def rounded(src, dtype):
    """The source model with its matrices rounded to `dtype` as the file stores them (1-D tensors stay fp32)."""
    model = load_model(src)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.to(dtype).float())
    return model


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_float_export_gives_the_source_logits_in_yunque_and_transformers(sources, tmp_path, case, kind):
    src = sources[case]
    path = export(src, tmp_path / f"{case}.{kind}.gguf", kind)
    ids = ids_for(src)
    ref = logits(load_model(src), ids)
    back = logits(load_model(import_gguf(path, tmp_path / "back")), ids)
    theirs = logits(hf_from_gguf(path), ids)
    assert ref.abs().max() > 1  # logits large enough for the bounds below to mean something
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[kind]
    exact = logits(rounded(src, dtype), ids)  # the source as the file stores it
    for got in (back, theirs):
        assert (got - exact).abs().max().item() <= 1e-4
    # Against the unrounded fp32 source: f32 is exact; f16's 11-bit weights move these logits (|l| <= ~2.7) by
    # 1.5e-3-2.7e-3 (1e-3 of the largest logit), bf16's 8-bit ones by ~8x that: the type's error, not the export's.
    bound = {"f32": 1e-4, "f16": 2e-3 * ref.abs().max().item(), "bf16": 2e-2 * ref.abs().max().item()}[kind]
    for got in (back, theirs):
        assert (got - ref).abs().max().item() <= bound, kind
    meta, types = metadata(path)
    want = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[kind]
    assert {t for n, t in types.items() if n.endswith("norm.weight") or n.endswith(".bias")} == {"F32"}
    assert {t for n, t in types.items() if not (n.endswith("norm.weight") or n.endswith(".bias"))} == {want}
    assert ("output.weight" in types) is not CASES[case][1]  # tied: no output.weight, as llama.cpp writes it


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("case", list(CASES))
def test_quantised_export(sources, tmp_path, case, kind, record_property):
    src = sources[case]
    path = export(src, tmp_path / f"{case}.{kind}.gguf", kind)
    ids = ids_for(src)
    ref = logits(load_model(src), ids)
    back = logits(load_model(import_gguf(path, tmp_path / "back")), ids)
    theirs = logits(hf_from_gguf(path), ids)
    assert (back - theirs).abs().max().item() <= 1e-4  # both dequantise the same blocks
    d, size = (back - ref).abs(), ref.abs()
    agree = (back.argmax(-1) == ref.argmax(-1)).float().mean().item()
    report = (
        f"{kind} {case}: max |d| {d.max():.4f}, mean |d| {d.mean():.5f} (|logits| max {size.max():.2f}, "
        f"mean {size.mean():.3f}); argmax agreement {agree:.2f}"
    )
    record_property("delta", report)
    print(report)
    # Measured: q8_0 up to 2.3% (max) / 1.7% (mean) of the logits, q4_0 up to 34% / 25% (random 64-wide rows)
    max_rel, mean_rel = {"q8_0": (0.05, 0.03), "q4_0": (0.5, 0.35)}[kind]
    assert d.max() <= max_rel * size.max() and d.mean() <= mean_rel * size.mean(), report
    meta, types = metadata(path)
    head = "token_embd.weight" if CASES[case][1] else "output.weight"
    matrices = {n: t for n, t in types.items() if not n.endswith(("norm.weight", ".bias"))}
    assert matrices.pop(head) == "Q8_0"  # llama-quantize keeps the head above Q4_0 (Q6_K there)
    assert set(matrices.values()) == {kind.upper()}
    assert meta["general.file_type"] == {"q8_0": 7, "q4_0": 2}[kind]


def test_metadata_is_what_llama_cpp_writes(sources, tmp_path):
    src = sources["llama-tied"]
    path = export(src, tmp_path / "m.gguf", "f16")
    meta, types = metadata(path)
    cfg = json.loads((src / "config.json").read_text())
    tok = load_tokenizer(src)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    expected = {
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 160,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": cfg["vocab_size"],
        "general.file_type": 1,
        "general.quantization_version": 2,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",  # yunque's own BPE splits as Llama 3 does
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.eot_token_id": tok.token_to_id("<|eot_id|>"),
        "tokenizer.ggml.padding_token_id": tok.token_to_id("<|finetune_right_pad_id|>"),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": tok.chat_template,
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    tokens, token_types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg["vocab_size"] == len(tok) + 5
    assert tokens[-5:] == [f"[PAD{i}]" for i in range(len(tok), len(tok) + 5)] and set(token_types[-5:]) == {5}
    assert token_types[tok.bos_id] == 3 and tokens[tok.bos_id] == "<|begin_of_text|>"
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    weights = (src / "model.safetensors").read_bytes()
    assert meta["general.yunque.source_sha256"] == hashlib.sha256(weights).hexdigest()
    assert "general.yunque.data_manifest_sha256" not in meta  # no training record
    assert "output.weight" not in types and types["blk.0.attn_q.weight"] == "F16"


def test_training_run_provenance(tmp_path):
    """A model in a yunque training run's out_dir carries the run's data manifest; a run.json that does
    not list these weights (another run's) is not believed."""
    src = make_model(tmp_path / "run", "model", trained_dir(tmp_path))
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    roots = {"train": {"records": 9, "merkle_root": "ab" * 32}, "val": {"records": 1, "merkle_root": "cd" * 32}}
    run = {
        "files_sha256": {"model/model.safetensors": digest},
        "data": {"manifest_sha256": "ef" * 32, "manifest_roots": {"manifest_sha256": "ef" * 32, "splits": roots}},
    }
    (src.parent / "run.json").write_text(json.dumps(run))
    meta, _ = metadata(export(src, tmp_path / "a.gguf", "f32"))
    assert meta["general.yunque.data_manifest_sha256"] == "ef" * 32
    assert meta["general.yunque.data_merkle_roots"] == [f"train:{'ab' * 32}", f"val:{'cd' * 32}"]
    run["files_sha256"] = {"model/model.safetensors": "00" * 32}
    (src.parent / "run.json").write_text(json.dumps(run))
    meta, _ = metadata(export(src, tmp_path / "b.gguf", "f32"))
    assert "general.yunque.data_manifest_sha256" not in meta


@pytest.mark.parametrize("case", list(CASES))
def test_tokenizer_round_trip(sources, tmp_path, case):
    src = sources[case]
    path = export(src, tmp_path / "t.gguf", "f16")
    ours = load_tokenizer(src)
    back = load_tokenizer(import_gguf(path, tmp_path / "back"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [*MIXED, "\n".join(MIXED), "<|im_start|>user\nhola<|im_end|>\n<|eot_id|>"]:
        ids = ours.encode(text, add_special_tokens=True)
        assert back.encode(text, add_special_tokens=True) == ids, text
        assert theirs(text).input_ids == ids, text
        assert back.decode(ids) == ours.decode(ids)
    assert back.chat_templates == ours.chat_templates
    assert back.stop_ids == ours.stop_ids and back.bos_id == ours.bos_id


def test_imported_model_keeps_its_pre_tokenizer_name(tmp_path):
    """What came in goes out: starcoder splits as smollm does, and a file that said starcoder keeps saying it."""
    path = write_gguf(tmp_path / "in.gguf", hf_tiny(vocab_size=320), pre="starcoder")
    src = import_gguf(path, tmp_path / "imported")
    meta, _ = metadata(export(src, tmp_path / "out.gguf", "f32"))
    original, _ = metadata(path)
    assert meta["tokenizer.ggml.pre"] == "starcoder"
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token"):
        assert meta[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    assert meta["tokenizer.chat_template"] == original["tokenizer.chat_template"]
    assert meta["general.yunque.imported_gguf_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    (src / "gguf_import.json").unlink()  # no record: the name is derived from the split
    meta, _ = metadata(export(src, tmp_path / "derived.gguf", "f32"))
    assert meta["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_rope_scaling_round_trips(tmp_path, scaling):
    src = make_model(tmp_path, "m", trained_dir(tmp_path), rope_scaling=scaling, rope_theta=500000.0, head_dim=None)
    path = export(src, tmp_path / "r.gguf", "f32")
    meta, types = metadata(path)
    assert ("rope_freqs.weight" in types) is (scaling["rope_type"] == "llama3")
    back = import_gguf(path, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["rope_scaling"] == scaling
    ids = ids_for(src)
    assert (logits(load_model(back), ids) - logits(load_model(src), ids)).abs().max().item() <= 1e-4


def test_base_plus_adapter_is_merged_first(sources, tmp_path):
    from lora_testing import perturb

    from yunque.formats.peft import save_peft_adapter
    from yunque.lora import LoraConfig, apply_lora, merge_lora

    src = sources["qwen2-bias"]
    model = load_model(src)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])
    apply_lora(model, cfg)
    perturb(model, std=0.3)
    save_peft_adapter(model, tmp_path / "adapter", cfg, str(src))
    path = export(src, tmp_path / "a.gguf", "f32", "--adapter", str(tmp_path / "adapter"))
    ids = ids_for(src)
    merge_lora(model)
    merged = logits(model, ids)
    assert (merged - logits(load_model(src), ids)).abs().max() > 0.1  # the adapter changes the answer
    assert (logits(hf_from_gguf(path), ids) - merged).abs().max().item() <= 1e-4
    meta, _ = metadata(path)
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert meta["general.yunque.adapter_sha256"] == hashlib.sha256(adapter_bytes).hexdigest()


def test_rows_that_do_not_fill_blocks_fall_back_to_f16():
    q = gguf.GGMLQuantizationType
    assert tensor_type("blk.0.ffn_down.weight", (64, 72), "q8_0", False) == q.F16  # 72 is not a multiple of 32
    assert tensor_type("blk.0.ffn_down.weight", (64, 96), "q4_0", False) == q.Q4_0
    assert tensor_type("output.weight", (64, 96), "q4_0", False) == q.Q8_0
    assert tensor_type("token_embd.weight", (64, 96), "q4_0", True) == q.Q8_0
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0", False) == q.F32


def test_errors_are_one_line(sources, tmp_path, capsys):
    src = sources["llama-gqa"]
    out = str(tmp_path / "x.gguf")

    def fails(*args, match):
        assert main(["export", str(src), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err, err
        return err

    fails("--format", "gguf", "--type", "q5_k", "--out", out, match="invalid choice: 'q5_k'")
    for err in (
        fails("--format", "onnx", "--type", "f16", "--out", str(tmp_path / "o"), match="applies to --format gguf only"),
        fails("--format", "gguf", "--opset", "20", "--out", out, match="applies to --format onnx only"),
        fails("--format", "gguf", "--out", str(tmp_path), match="is a directory"),
    ):
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    export(src, tmp_path / "x.gguf", "f32")
    before = (tmp_path / "x.gguf").read_bytes()
    assert len(fails("--format", "gguf", "--out", out, match="pass --overwrite").splitlines()) == 1
    export(src, tmp_path / "x.gguf", "q8_0", "--overwrite")
    assert (tmp_path / "x.gguf").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind


def test_vocabularies_and_models_llama_cpp_cannot_run_are_refused(tmp_path, capsys):
    tokens, types, scores = sp_vocab(500)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": None,
        "tokenizer.ggml.merges": None,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.padding_token_id": None,
    }
    path = write_gguf(tmp_path / "sp.gguf", hf_tiny(vocab_size=len(tokens)), tokens=(tokens, types, []), meta=meta)
    sp = import_gguf(path, tmp_path / "sp")
    mistral = make_model(tmp_path, "mistral", trained_dir(tmp_path), arch="MistralForCausalLM", sliding_window=16)
    for src, match in ((sp, "not a byte-level BPE tokenizer"), (mistral, "sliding_window 16")):
        assert main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_runs_the_export_as_yunque_runs_the_source(sources, tmp_path, case):
    """llama.cpp itself (llama-cpp-python, an optional peer) on the exported f16 file: its logits along
    yunque's greedy continuations of 3 prompts x 32 tokens are yunque's, and its own greedy continuation
    is yunque's up to the first near-tie. (A random model has near-ties, top-2 gaps of 1e-4, that f16
    activations, as llama.cpp's CPU matmuls use, may break either way; SmolLM2 below has none.)"""
    llama_cpp = pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    from llama_peer import greedy_llama_cpp, greedy_yunque, logits_llama_cpp, open_llama_cpp

    src = sources[case]
    llm = open_llama_cpp(llama_cpp, export(src, tmp_path / f"{case}.gguf", "f16"))
    tok = load_tokenizer(src)
    prompts = [tok.encode(t, add_special_tokens=True)[:12] for t in MIXED[:3]]
    ours = greedy_yunque(src, prompts, 32)
    theirs = greedy_llama_cpp(llm, prompts, 32)
    model = load_model(src)
    for prompt, a, b in zip(prompts, ours, theirs, strict=True):
        ids = prompt + a
        ref = logits(model, torch.tensor([ids]))[0]
        got = torch.from_numpy(logits_llama_cpp(llm, ids))
        assert (got - ref).abs().max().item() <= 5e-3  # measured <= 2e-3 (|logits| <= 2.7)
        top2 = ref[len(prompt) - 1 : -1].topk(2, dim=-1).values
        tie = next((i for i, (x, y) in enumerate(top2.tolist()) if x - y < 1e-2), 32)
        assert b[:tie] == a[:tie], (case, tie)
        print(f"{case}: llama.cpp = yunque for {sum(x == y for x, y in zip(a, b))}/32 tokens (first near-tie at {tie})")


# -- SmolLM2-135M-Instruct (bash install.sh installs it) -------------------------------------------
SMOL = CATALOGUE["smollm2-135m-instruct"]
SMOL_GGUF = locate(SMOL)
needs_smol = pytest.mark.skipif(SMOL_GGUF is None, reason=f"SmolLM2-135M-Instruct is not installed ({SMOL.install})")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(SmolLM2 imported by yunque, its f16 export)."""
    root = tmp_path_factory.mktemp("smollm2")
    src = import_gguf(SMOL_GGUF, root / "model")
    return src, export(src, root / "smollm2-f16.gguf", "f16")


@pytest.mark.slow
@needs_smol
def test_smollm2_f16_in_transformers_gives_yunques_logits(smol):
    src, path = smol
    tok = load_tokenizer(src)
    ids = torch.tensor([tok.encode("\n".join(MIXED[:5]))[:96]])
    ref = logits(load_model(src), ids)  # yunque on the source
    exact = logits(rounded(src, torch.float16), ids)  # the same, its weights rounded as the file stores them
    theirs = logits(hf_from_gguf(path), ids)
    d_exact, d = (theirs - exact).abs(), (theirs - ref).abs()
    agree = (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        f"SmolLM2 f16: vs rounded source max {d_exact.max():.2e}; vs source max {d.max():.4f} "
        f"mean {d.mean():.5f}; argmax agreement {agree:.3f}; |logits| <= {ref.abs().max():.1f}"
    )
    # 30 layers of fp32 summed in another order (test_smollm2 measures up to ~1.2e-4 for the same weights)
    assert d_exact.max().item() <= 2e-4
    assert agree >= 0.95 and d.mean().item() <= 0.05
    meta, _ = metadata(path)
    original, _ = metadata(SMOL_GGUF)
    assert meta["tokenizer.ggml.pre"] == original["tokenizer.ggml.pre"] == "smollm"
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id"):
        assert meta[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    assert meta["tokenizer.chat_template"] == original["tokenizer.chat_template"]
    assert meta["general.yunque.imported_gguf_sha256"] == SMOL.sha256


@pytest.mark.slow
@needs_smol
def test_smollm2_greedy_continuations_equal_in_llama_cpp(smol):
    llama_cpp = pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    from llama_peer import greedy_llama_cpp, greedy_yunque, open_llama_cpp

    src, path = smol
    tok = load_tokenizer(src)
    prompts = [tok.encode(t) for t in MIXED[:3]]
    assert greedy_llama_cpp(open_llama_cpp(llama_cpp, path), prompts, 32) == greedy_yunque(src, prompts, 32)
