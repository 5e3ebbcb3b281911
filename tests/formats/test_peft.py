"""PEFT adapter directories: parity with peft + transformers in both directions, and clear errors."""

import json

import pytest
import torch
from hf_models import tiny_hf_model
from lora_testing import perturb
from safetensors.torch import load_file, save_file

from yunque.errors import CheckpointError
from yunque.formats.hf import load_model
from yunque.formats.peft import load_peft_adapter, save_peft_adapter
from yunque.lora import LoraConfig, apply_lora, lora_modules

peft = pytest.importorskip("peft")


@pytest.fixture
def base(tmp_path):
    """(family -> (transformers model, our model loaded from its saved directory, the directory))"""

    def make(family):
        hf = tiny_hf_model(family)
        d = tmp_path / f"base-{family}"
        hf.save_pretrained(d)
        return hf, load_model(d), d

    return make


X = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "family,cfg",
    [
        ("llama", LoraConfig(r=4, alpha=8)),
        ("llama-bias", LoraConfig(r=8, alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"])),
        ("qwen2", LoraConfig(r=2, alpha=7, target_modules=["down_proj", "k_proj"])),
        ("llama-gqa", LoraConfig(r=4, alpha=4, target_modules=["layers.1.self_attn.o_proj", "layers.0.mlp.up_proj"])),
    ],
)
def test_our_adapter_loads_in_peft_with_identical_logits(base, tmp_path, family, cfg):
    hf, ours, d = base(family)
    with torch.no_grad():
        before = ours(X)
    apply_lora(ours, cfg)
    perturb(ours)
    save_peft_adapter(ours, tmp_path / "adapter", cfg, base_model_name_or_path=str(d))
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == cfg.r and conf["use_rslora"] == cfg.use_rslora
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        a, b = ours(X), pm(X).logits
    assert (a - before).abs().max() > 0.05  # the adapter matters, so parity means something
    assert (a - b).abs().max() <= 1e-4
    # peft's own view of the adapter matches: same modules carry LoRA
    peft_mods = {
        n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)
    }
    assert peft_mods == set(lora_modules(ours))


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", dict(r=6, lora_alpha=3, target_modules=["k_proj", "up_proj", "o_proj"])),
        ("mistral", dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear")),
        ("llama-tied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], layers_to_transform=[1])),
    ],
)
def test_peft_written_adapter_loads_into_ours_with_identical_logits(base, tmp_path, family, kw):
    hf, ours, _ = base(family)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    cfg = load_peft_adapter(ours, tmp_path / "adapter")
    assert cfg.r == kw["r"] and cfg.alpha == kw["lora_alpha"] and cfg.use_rslora == kw.get("use_rslora", False)
    if kw.get("layers_to_transform"):
        assert all(".layers.1." in n for n in lora_modules(ours))
    pm.eval()
    with torch.no_grad():
        assert (ours(X) - pm(X).logits).abs().max() <= 1e-4


def test_round_trip_through_our_format_keeps_weights(base, tmp_path):
    _, ours, d = base("llama")
    cfg = LoraConfig(r=4, target_modules=["v_proj"])
    apply_lora(ours, cfg)
    perturb(ours)
    save_peft_adapter(ours, tmp_path / "a", cfg)
    (tmp_path / "a" / "README.md").write_text("kept")
    save_peft_adapter(ours, tmp_path / "a", cfg)  # saving again over an existing dir keeps other files
    assert (tmp_path / "a" / "README.md").read_text() == "kept"
    fresh = load_model(d)
    got = load_peft_adapter(fresh, tmp_path / "a")
    assert got == cfg
    with torch.no_grad():
        assert torch.equal(fresh(X), ours(X))


def test_saving_with_a_config_that_does_not_match_the_model_is_refused(base, tmp_path):
    from yunque.errors import ConfigError

    _, ours, _ = base("llama")
    apply_lora(ours, LoraConfig(r=4, alpha=8))
    with pytest.raises(ConfigError, match="has r=4, scale=2 but the config says r=8, scale=4"):
        save_peft_adapter(ours, tmp_path / "a", LoraConfig(r=8, alpha=32))
    assert not (tmp_path / "a").exists()


def _adapter(base, tmp_path, cfg=LoraConfig(r=4, target_modules=["q_proj"])):
    _, ours, d = base("llama")
    apply_lora(ours, cfg)
    perturb(ours)
    save_peft_adapter(ours, tmp_path / "a", cfg)
    return tmp_path / "a", d


def _edit_config(adapter, **changes):
    p = adapter / "adapter_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def test_errors_name_the_file_and_tensor(base, tmp_path):
    adapter, d = _adapter(base, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    sd = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"

    save_file({**sd, key: torch.zeros(4, 63)}, weights)
    model = load_model(d)
    with pytest.raises(
        CheckpointError,
        match=rf"adapter_model.safetensors: tensor {key} has shape \[4, 63\], the model needs \[4, 64\]",
    ):
        load_peft_adapter(model, adapter)
    assert not lora_modules(model)  # nothing was touched

    save_file({**sd, key.replace("q_proj", "qq_proj"): sd[key].clone()}, weights)
    with pytest.raises(
        CheckpointError,
        match=r"tensor .*qq_proj.lora_A.weight: target module model.layers.1.self_attn.qq_proj not found",
    ):
        load_peft_adapter(load_model(d), adapter)

    save_file({k: v for k, v in sd.items() if k != key.replace("lora_A", "lora_B")}, weights)
    with pytest.raises(CheckpointError, match=r"tensor .*layers.1.self_attn.q_proj.lora_B.weight is missing"):
        load_peft_adapter(load_model(d), adapter)

    save_file({**sd, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 320)}, weights)
    with pytest.raises(CheckpointError, match="lora_embedding_A is not a LoRA weight"):
        load_peft_adapter(load_model(d), adapter)

    save_file(sd, weights)
    _edit_config(adapter, target_modules=["v_proj"])
    with pytest.raises(CheckpointError, match=r"q_proj.lora_A.weight is for a module that target_modules \['v_proj'\]"):
        load_peft_adapter(load_model(d), adapter)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(use_dora=True), "use_dora=True is not supported"),
        (dict(bias="all"), "bias='all' is not supported"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save=\\['lm_head'\\] is not supported"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern=.* is not supported"),
        (dict(peft_type="IA3"), "peft_type is 'IA3'; only LORA"),
        (dict(r="four"), "field 'r' is missing or not a number"),
        (dict(lora_dropout=1.5), "dropout: must be < 1"),
    ],
)
def test_unsupported_or_invalid_configs_are_refused(base, tmp_path, change, match):
    adapter, d = _adapter(base, tmp_path)
    _edit_config(adapter, **change)
    with pytest.raises(CheckpointError, match=f"adapter_config.json: .*{match}"):
        load_peft_adapter(load_model(d), adapter)


def test_missing_files_and_pickle_only_adapters(base, tmp_path):
    adapter, d = _adapter(base, tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(
        CheckpointError, match="adapter_model.safetensors: not found; only adapter_model.bin found, a pickle"
    ):
        load_peft_adapter(load_model(d), adapter)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json: not found"):
        load_peft_adapter(load_model(d), adapter)
    with pytest.raises(CheckpointError, match="adapter directory not found"):
        load_peft_adapter(load_model(d), tmp_path / "nope")
