"""`yunque merge`: base + adapter -> a plain HF directory with the logits of base + adapter."""

import json

import pytest
import torch
from hf_models import tiny_hf_model
from lora_testing import perturb
from safetensors.torch import load_file, save_file

from yunque.cli import call_with_argv
from yunque.errors import CheckpointError
from yunque.formats.hf import load_model, save_model
from yunque.formats.peft import save_peft_adapter
from yunque.lora import LoraConfig, apply_lora, merge_lora
from yunque.recipes.merge import merge_cmd

X = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def trained(tmp_path):
    """A base HF dir (with tokenizer files) and a LoRA adapter dir trained on it."""

    def make(cfg=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), family="llama-bias"):
        base = tmp_path / "base"
        tiny_hf_model(family).save_pretrained(base)
        (base / "tokenizer.json").write_text('{"version": "1.0"}')
        (base / "tokenizer_config.json").write_text("{}")
        model = load_model(base)
        apply_lora(model, cfg)
        perturb(model)
        save_peft_adapter(model, tmp_path / "adapter", cfg, str(base))
        return base, tmp_path / "adapter", model

    return make


def test_merge_lora_then_save_model_matches_base_plus_adapter_in_transformers(trained, tmp_path):
    import transformers

    _, _, model = trained()
    with torch.no_grad():
        ref = model(X)
    merge_lora(model)
    save_model(model, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf(X).logits - ref).abs().max() <= 1e-4


def test_merge_cli_writes_hf_dir_copies_tokenizer_and_matches_peft(trained, tmp_path, capsys):
    import peft
    import transformers

    base, adapter, _ = trained(LoraConfig(r=8, alpha=4, use_rslora=True))
    call_with_argv(
        merge_cmd, ["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")], prog="yunque merge"
    )
    printed = capsys.readouterr().out
    assert (
        "merged 14 LoRA modules" in printed and "r=8" in printed and "tokenizer.json, tokenizer_config.json" in printed
    )
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}' and (out / "config.json").is_file()
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (merged(X).logits - pm(X).logits).abs().max() <= 1e-4
    with pytest.raises(CheckpointError, match="already holds a model.*--overwrite"):
        merge_cmd(base=str(base), adapter=str(adapter), out=str(out))
    merge_cmd(base=str(base), adapter=str(adapter), out=str(out), overwrite=True)
    with pytest.raises(CheckpointError, match="must be a new directory"):
        merge_cmd(base=str(base), adapter=str(adapter), out=str(base))


def test_qlora_adapter_merges_into_the_dequantised_base_it_was_trained_on(tmp_path):
    pytest.importorskip("bitsandbytes")
    base = tmp_path / "base"
    tiny_hf_model("qwen2").to(torch.bfloat16).save_pretrained(base)
    model = load_model(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, alpha=8, quantize_base=True, double_quant=True)
    apply_lora(model, cfg)
    perturb(model, std=0.05)
    save_peft_adapter(model, tmp_path / "adapter", cfg)
    with torch.no_grad():
        ref = model(X)  # what was trained: NF4 base + adapter
    merge_cmd(base=str(base), adapter=str(tmp_path / "adapter"), out=str(tmp_path / "merged"))
    merged = load_model(tmp_path / "merged")
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the original dtype
    with torch.no_grad():
        out = merged.float()(X)
    # bf16 rounding of the merged weights is the only difference from the trained function
    assert ((out - ref).norm() / ref.norm()) < 0.01
    fp32_merged = load_model(base, dtype=torch.float32)
    from yunque.formats.peft import load_peft_adapter

    load_peft_adapter(fp32_merged, tmp_path / "adapter")  # QLoRA settings come from the adapter's metadata
    assert type(fp32_merged.model.layers[0].mlp.up_proj.base).__name__ == "NF4Linear"
    with torch.no_grad():
        assert (fp32_merged(X) - ref).abs().max() <= 1e-4
        merge_lora(fp32_merged)
        assert (fp32_merged(X) - ref).abs().max() <= 1e-4
    merge_cmd(base=str(base), adapter=str(tmp_path / "adapter"), out=str(tmp_path / "orig"), original_base=True)
    orig = load_model(tmp_path / "orig").float()
    with torch.no_grad():
        assert (orig(X) - out).abs().max() > 1e-3  # a different (un-quantised) base was used


def test_merge_errors_are_clear(trained, tmp_path):
    base, adapter, _ = trained()
    weights = adapter / "adapter_model.safetensors"
    sd = load_file(weights)
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    save_file({**sd, key: torch.zeros(63, 4)}, weights)
    with pytest.raises(
        CheckpointError, match=rf"{weights}: tensor {key} has shape \[63, 4\], the model needs \[64, 4\]"
    ):
        merge_cmd(base=str(base), adapter=str(adapter), out=str(tmp_path / "o1"))
    save_file({k.replace("down_proj", "proj_down"): v for k, v in sd.items()}, weights)
    with pytest.raises(CheckpointError, match=r"target module model.layers.0.mlp.proj_down not found in the model"):
        merge_cmd(base=str(base), adapter=str(adapter), out=str(tmp_path / "o2"))
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{adapter / 'adapter_config.json'}: not found"):
        merge_cmd(base=str(base), adapter=str(adapter), out=str(tmp_path / "o3"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_merge_cli_exits_2_with_one_line_error(trained, tmp_path, capsys, monkeypatch):
    from yunque.__main__ import COMMANDS, main

    base, adapter, _ = trained()
    (adapter / "adapter_config.json").unlink()
    monkeypatch.setitem(COMMANDS, "merge", ("yunque.recipes.merge", "merge_cmd", "merge a LoRA adapter into its base"))
    assert main(["merge", "--base", str(base), "--adapter", str(adapter)]) == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "adapter_config.json: not found" in err and "Traceback" not in err
    assert json.loads((base / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
