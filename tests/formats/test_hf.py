"""HF directories: round trips with transformers, sharding, lean loading, and every refusal."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hf_models import tiny_hf_model

from yunque.errors import CheckpointError
from yunque.formats.hf import load_model, save_model
from yunque.model import ModelConfig, Transformer


@pytest.fixture
def hf_dir(tmp_path):
    hf = tiny_hf_model("llama-gqa")
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def test_save_then_transformers_loads_same_logits(tmp_path):
    import transformers

    for fam in ("llama3-rope", "qwen2", "mistral", "llama-tied", "llama-bias"):
        hf = tiny_hf_model(fam)
        hf.save_pretrained(tmp_path / fam)
        ours = load_model(tmp_path / fam)
        save_model(ours, tmp_path / f"{fam}-out")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{fam}-out").eval()
        ids = torch.randint(3, 320, (2, 24))
        with torch.no_grad():
            assert (back(ids).logits - ours(ids)).abs().max() <= 1e-5, fam


def test_sharded_save_and_load(tmp_path, hf_dir):
    _, d = hf_dir
    m = load_model(d)
    save_model(m, tmp_path / "sharded", max_shard_bytes=40_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    m2 = load_model(tmp_path / "sharded")
    ids = torch.randint(3, 320, (1, 10))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        assert (back(ids).logits - m(ids)).abs().max() <= 1e-5


def test_dtype_conversion_on_load(hf_dir):
    _, d = hf_dir
    m = load_model(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def _expect(d, needle):
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert needle in str(e.value), str(e.value)
    return str(e.value)


def test_refuses_pickle_only_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_model("llama").config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    msg = _expect(tmp_path, "pytorch_model.bin")
    assert "never unpickles" in msg and "safe_serialization" in msg


def test_truncated_safetensors(hf_dir):
    _, d = hf_dir
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    msg = _expect(d, "truncated")
    assert "model.safetensors" in msg


def test_corrupt_header(hf_dir):
    _, d = hf_dir
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    _expect(d, "corrupt safetensors header")


def test_missing_shard(tmp_path, hf_dir):
    _, d = hf_dir
    save_model(load_model(d), tmp_path / "s", max_shard_bytes=40_000)
    victim = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
    victim.unlink()
    _expect(tmp_path / "s", f"{victim.name}: shard listed in model.safetensors.index.json is missing")


def test_shape_mismatch_names_tensor(hf_dir):
    _, d = hf_dir
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(d, "model.layers.0.mlp.gate_proj.weight has shape [160, 64], the config needs [128, 64]")


def test_missing_and_unexpected_tensors(tmp_path, hf_dir):
    from safetensors.torch import load_file, save_file

    _, d = hf_dir
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    _expect(d, "missing tensor model.layers.1.mlp.up_proj.weight")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(160, 64)
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    _expect(d, "unexpected tensor model.layers.0.extra.weight")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures 'GPT2LMHeadModel' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor is missing"),
        ({"hidden_size": None}, "field 'hidden_size' is missing"),
    ],
)
def test_config_errors_before_weights(tmp_path, change, needle):
    cfg = tiny_hf_model("llama").config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.pop("rope_parameters", None)
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # No weights at all: the config error must come first.
    msg = _expect(tmp_path, needle)
    assert "config.json" in msg


def test_cli_reports_error_without_traceback(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "config.json").write_text(
        json.dumps({**tiny_hf_model("llama").config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    )
    r = subprocess.run([sys.executable, "-m", "yunque", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_peak_rss_while_loading_is_lean(tmp_path):
    """Peak RSS growth while loading <= 1.3x the weights in the target dtype (here bf16 file -> fp32)."""
    cfg = ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    m = Transformer(cfg).to(torch.bfloat16)
    save_model(m, tmp_path / "m")
    weights_fp32 = sum(p.numel() for p in m.parameters()) * 4
    code = textwrap.dedent(f"""
        import torch, re
        from yunque.formats.hf import load_model
        def rss(key):
            return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        # Warm up: the first module built on the meta device loads ~70 MB of torch internals once.
        with torch.device("meta"):
            torch.nn.Embedding(8, 8)
        base = rss("VmRSS")
        m = load_model({str(tmp_path / "m")!r}, dtype=torch.float32)
        print(rss("VmHWM") - base)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(r.stdout.strip().splitlines()[-1])
    assert growth <= 1.3 * weights_fp32, f"peak growth {growth / 1e6:.0f} MB for {weights_fp32 / 1e6:.0f} MB of weights"
