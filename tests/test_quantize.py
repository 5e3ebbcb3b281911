"""Inference quantisation (`yunque quantize`): codes, kernels, quality on a tiny model, directories that
describe themselves and load in every inference command, and refusals."""

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from yunque.__main__ import main
from yunque.errors import CheckpointError, ConfigError, YunqueError
from yunque.formats.hf import load_model, save_model
from yunque.generate import Sampling, generate
from yunque.inference import load
from yunque.model import ModelConfig, Transformer
from yunque.quantize import (
    KERNEL_MAX_ROWS,
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    dequantize,
    pack_int4,
    quantize_model_,
    quantize_weight,
    unpack_int4,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def peaked_model(vocab: int = 256, tied: bool = False, seed: int = 0) -> Transformer:
    """A random tiny model whose predictions are peaked like a trained one's (perplexity ~50 of 256),
    so that weight errors show in its perplexity."""
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    m = Transformer(cfg)
    m.init_weights()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not n.endswith("norm.weight"):
                p.mul_(12.0 if n.startswith("lm_head") else 3.0)
    return m.eval()


def perplexity(model, text: torch.Tensor) -> float:
    with torch.no_grad():
        lg = model(text[:, :-1]).float()
    return math.exp(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), text[:, 1:].reshape(-1)).item())


# ---------------------------------------------------------------- codes


@pytest.mark.parametrize(
    "bits,group,sym,bound", [(8, -1, True, 0.01), (4, 32, True, 0.095), (4, 64, False, 0.1), (4, 128, True, 0.115)]
)
def test_quantize_weight_reconstructs_within_the_format_error(bits, group, sym, bound):
    """Bounds ~10% above the rounding error of Gaussian weights: step / sqrt(12) relative to the spread."""
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3] = 0  # an all-zero row must not divide by zero
    qc = QuantConfig(bits, group, sym)
    q = quantize_weight(w, qc)
    deq = dequantize(q["qweight"], q["weight_scale"], q.get("weight_zero_point"), bits, torch.float32)
    assert ((deq - w).norm() / w.norm()).item() < bound
    assert torch.equal(deq[3], torch.zeros(256))
    if bits == 8:
        assert q["qweight"].dtype == torch.int8 and q["weight_scale"].shape == (48, 1)
        # per output channel: the largest weight of each row is exact up to rounding of the scale
        assert torch.allclose(deq.abs().amax(1), w.abs().amax(1), rtol=1e-6)
    else:
        assert q["qweight"].shape == (48, 128) and q["weight_scale"].shape == (48, 256 // group)
        assert q["weight_scale"].dtype == torch.float16
        codes = unpack_int4(q["qweight"])
        assert int(codes.max()) <= 15
        if sym:  # q4_0's mapping: the largest magnitude of every group hits code 0 (-8 * scale) exactly
            big = w.view(48, -1, group).abs().amax(-1)
            assert torch.allclose(deq.view(48, -1, group).abs().amax(-1), big, rtol=1e-3)
        else:
            z = q["weight_zero_point"]
            assert z.dtype == torch.uint8 and int(z.max()) <= 15
            # asymmetric: a one-signed group uses all 16 levels, more than symmetric gives it
            pos = w.abs() + 0.01
            err = lambda c: (  # noqa: E731
                dequantize(
                    *(lambda d: (d["qweight"], d["weight_scale"], d.get("weight_zero_point")))(  # noqa: E731
                        quantize_weight(pos, c)
                    ),
                    4,
                    torch.float32,
                )
                - pos
            ).norm()
            assert err(qc) < 0.75 * err(QuantConfig(4, group, True))


def test_int4_packing_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("bits,group,sym", [(8, -1, True), (4, 32, True), (4, 64, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_compute_the_dequantised_linear(bits, group, sym, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True)
    q = QuantLinear.from_linear(lin, QuantConfig(bits, group, sym))
    w = q.dequantize(torch.float32)
    for rows in (1, 5, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1):  # kernels, then dequantise + GEMM
        x = torch.randn(rows, 2, 64).to(dtype).view(rows, 128)[None]
        ref = F.linear(x.float(), w, lin.bias.detach())
        y = q(x)
        assert y.shape == (1, rows, 96) and y.dtype == dtype
        # the kernels take bf16 activations: fp32 ones are rounded, so bf16's tolerance for both
        exact = dtype == torch.float32 and rows > KERNEL_MAX_ROWS
        tol = 1e-5 if exact else 2e-2
        assert (y.float() - ref).abs().max().item() < tol * ref.abs().max().item()
    assert q._kernel is not None
    assert torch.equal(q(x[:, :1]), q(x[:, :1]))


def test_int4_rows_the_cpu_kernel_cannot_lay_out_use_the_generic_path():
    lin = torch.nn.Linear(64, 100)  # the int4 kernel's layout wants out_features in blocks of 16
    q = QuantLinear.from_linear(lin, QuantConfig(4, 32))
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), F.linear(x, q.dequantize(torch.float32), lin.bias.detach()), atol=1e-5)
    assert q._kernel is None


def test_config_validation():
    with pytest.raises(ConfigError, match="group-size"):
        QuantConfig(8, 32)
    with pytest.raises(ConfigError, match="group-size must be one of"):
        QuantConfig(4, 16)
    with pytest.raises(ConfigError, match="bits must be 8 or 4"):
        QuantConfig(3, 32)
    with pytest.raises(ConfigError, match="ties lm_head"):
        quantize_model_(peaked_model(tied=True), QuantConfig(8, modules_to_not_convert=("model.embed_tokens",)))
    m = peaked_model()
    m.model.layers[0].mlp.down_proj = torch.nn.Linear(96, 64)
    with pytest.raises(ConfigError, match="model.layers.0.mlp.down_proj: --group-size 64 does not divide 96"):
        quantize_model_(m, QuantConfig(4, 64))


# ---------------------------------------------------------------- quality


@pytest.mark.parametrize("path", ["dequantise + GEMM", "kernels"])
def test_int8_perplexity_within_one_percent_of_fp32_and_int4_measurably_worse(path, monkeypatch):
    if path == "kernels":  # as decode runs them: bf16 activations into the packed kernels, for all 1024 rows
        monkeypatch.setattr("yunque.quantize.KERNEL_MAX_ROWS", 1 << 30)
    m = peaked_model()
    text = torch.tensor(generate(m, [[1]] * 8, Sampling(max_new_tokens=128, temperature=1.0, seed=0)))
    base = perplexity(m, text)
    assert base < 100  # peaked: far from the uniform 256, so the bound below means something
    rel = {}
    for name, qc in {
        "int8": QuantConfig(8),
        "int8+head": QuantConfig(8, modules_to_not_convert=()),
        "int4": QuantConfig(4, 32),
    }.items():
        q = copy.deepcopy(m)
        quantize_model_(q, qc)
        rel[name] = abs(perplexity(q, text) / base - 1)
        assert (q.model.layers[0].mlp.up_proj._kernel is not None) == (path == "kernels")
    assert rel["int8"] < 0.01 and rel["int8+head"] < 0.01, rel
    assert 0.01 < rel["int4"] < 0.15, rel  # the measure does see weight error


# ---------------------------------------------------------------- directories


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Untied and tied tiny model directories with a tokenizer."""
    from eval_helpers import make_tokenizer

    root = tmp_path_factory.mktemp("quant")
    tok = make_tokenizer(root)
    dirs = {}
    for tied in (False, True):
        m = peaked_model(vocab=tok.vocab_size, tied=tied)
        d = save_model(m, root / ("tied" if tied else "untied"))
        tok.save(d)
        dirs[tied] = d
    return dirs


CASES = {
    "int8": (False, ["--bits", "8"], QuantConfig(8)),
    "int8-head": (
        False,
        ["--bits", "8", "--include-head"],
        QuantConfig(8, modules_to_not_convert=("model.embed_tokens",)),
    ),
    "int4-asym-all": (
        False,
        ["--bits", "4", "--group-size", "64", "--asymmetric", "--include-head", "--include-embedding"],
        QuantConfig(4, 64, False, ()),
    ),
    "int8-tied-float-head": (True, ["--bits", "8"], QuantConfig(8)),
    "int4-tied": (True, ["--bits", "4", "--include-head", "--include-embedding"], QuantConfig(4, 32, True, ())),
}


@pytest.mark.parametrize("case", CASES)
def test_quantised_directory_round_trips_to_the_in_memory_model(model_dirs, tmp_path, case, capsys):
    tied, args, qc = CASES[case]
    src, out = model_dirs[tied], tmp_path / "q"
    assert main(["quantize", str(src), "--out", str(out), *args]) == 0
    assert "bits per weight" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == qc.to_hf()
    assert cfg["quantization_config"]["quant_method"] == "yunque" and cfg["torch_dtype"] == "float32"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        qw = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert qw.dtype == (torch.int8 if qc.bits == 8 else torch.uint8)
    assert ("lm_head.weight" in names) == (not tied and "lm_head" in qc.modules_to_not_convert)
    assert not any(n.startswith("lm_head.") for n in names) or not tied  # a tied matrix is stored once

    mem = load_model(src)
    quantize_model_(mem, qc)
    loaded, tok = load(out, dtype="float32", device="cpu")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    quant_emb = "model.embed_tokens" not in qc.modules_to_not_convert
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding) == quant_emb
    ids = torch.tensor([tok.encode("the cat sat on the mat")] * 2)
    with torch.no_grad():
        assert torch.equal(loaded(ids), mem(ids))
    s = Sampling(max_new_tokens=12)
    assert generate(loaded, [ids[0].tolist()], s) == generate(mem, [ids[0].tolist()], s)
    if tied and qc.modules_to_not_convert:  # a float pair stays one Parameter
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    elif tied:  # one matrix in memory too: the head reads the embedding's codes
        assert loaded.lm_head.weight_scale is loaded.model.embed_tokens.weight_scale


def test_inference_commands_load_a_quantised_directory(model_dirs, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(model_dirs[False]), "--out", str(out), "--bits", "4", "--include-head"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    from yunque.evaluate.loading import load_for_eval
    from yunque.evaluate.perplexity import perplexity as eval_ppl
    from yunque.serve.engine import Engine

    m, tok = load_for_eval(out)
    assert math.isfinite(eval_ppl(m, tok, ["the dog ran in the park"]).perplexity)
    m, tok = load(out, dtype="bfloat16")  # codes stay int4, the rest and the kernels run in bf16
    assert m.model.norm.weight.dtype == torch.bfloat16 and m(torch.tensor([[3, 4]])).dtype == torch.bfloat16
    Engine(m, tok, max_batch=2, max_len=32, max_queue=4)  # the server's KV pool takes the model's dtype


def test_quantised_directory_refused_for_training_merging_and_export(model_dirs, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["quantize", str(model_dirs[False]), "--out", str(out), "--bits", "8"]) == 0
    with pytest.raises(CheckpointError, match="quantised for inference .*Training, merging"):
        load_model(out)
    from train_util import make_corpus, write_cfg

    corpus = make_corpus(tmp_path / "c", n_lines=20)
    cfg = write_cfg(
        tmp_path / "ft.yaml",
        {
            "method": "lora",
            "out_dir": str(tmp_path / "run"),
            "tokenizer": str(out),
            "model": {"path": str(out)},
            "data": {"train": [str(corpus["text"])], "seq_len": 32},
            "micro_batch": 2,
            "max_steps": 1,
        },
    )
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    assert "quantised for inference" in capsys.readouterr().err
    assert main(["quantize", str(out), "--out", str(tmp_path / "again"), "--bits", "4"]) == 2
    assert "quantised for inference" in capsys.readouterr().err
    with pytest.raises(YunqueError, match="adapter cannot be applied to a quantised model"):
        load(out, adapter=tmp_path)


def test_bad_quantization_config_and_tensors_are_named(model_dirs, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dirs[False]), "--out", str(out), "--bits", "8"]) == 0
    cfg_path = out / "config.json"
    good = json.loads(cfg_path.read_text())
    for patch, msg in (
        ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
        ({"bits": 3}, "bits must be 8 or 4"),
        ({"group_size": "32"}, "group_size must be an integer"),
        ({"sym": 1}, "sym must be a boolean"),
        ({"desc_act": False}, "desc_act is not a known field"),
    ):
        cfg_path.write_text(json.dumps({**good, "quantization_config": {**good["quantization_config"], **patch}}))
        with pytest.raises(CheckpointError, match=msg):
            load(out)
    # int4 config over int8 tensors: the shapes or dtypes say so before anything is computed
    cfg_path.write_text(json.dumps({**good, "quantization_config": QuantConfig(4, 64).to_hf()}))
    with pytest.raises(CheckpointError, match="qweight has shape"):
        load(out)
    cfg_path.write_text(json.dumps(good))
    from safetensors.torch import load_file, save_file

    sd = load_file(out / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.qweight"] = sd["model.layers.0.mlp.up_proj.qweight"].to(torch.uint8)
    save_file(sd, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="up_proj.qweight is torch.uint8, quantization_config needs torch.int8"):
        load(out)


def test_quantize_command_errors(model_dirs, tmp_path, capsys):
    src = model_dirs[True]
    for args, msg in (
        (["--bits", "8", "--group-size", "32"], "--group-size applies to --bits 4"),
        (["--bits", "4", "--include-head"], "ties lm_head to embed_tokens"),
        (["--bits", "8", "--out", str(src)], "must be a new directory"),
    ):
        full = ["quantize", str(src), *args] + ([] if "--out" in args else ["--out", str(tmp_path / "o")])
        assert main(full) == 2
        assert msg in capsys.readouterr().err
    shutil.copytree(src, tmp_path / "exists")
    assert main(["quantize", str(src), "--bits", "8", "--out", str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err
