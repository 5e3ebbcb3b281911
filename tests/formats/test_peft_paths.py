"""PEFT adapters and merges read only files inside their directories (issue 24 item 8), and a
malformed adapter_config.json is one error (item 10)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hf_models import tiny_hf_model

from yunque.__main__ import main
from yunque.errors import CheckpointError
from yunque.formats.hf import load_model
from yunque.formats.peft import load_peft_adapter, merge_adapter, save_peft_adapter
from yunque.lora import LoraConfig, apply_lora


@pytest.fixture
def base_and_adapter(tmp_path):
    base = tmp_path / "base"
    tiny_hf_model("llama").save_pretrained(base)
    (base / "tokenizer_config.json").write_text("{}")
    model = load_model(base)
    cfg = LoraConfig(r=2, alpha=4, target_modules=["q_proj"])
    apply_lora(model, cfg)
    save_peft_adapter(model, tmp_path / "adapter", cfg, str(base))
    return base, tmp_path / "adapter"


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "id_rsa"
    p.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return p


def test_merge_does_not_copy_a_tokenizer_file_linked_outside(base_and_adapter, tmp_path, secret):
    base, adapter = base_and_adapter
    os.symlink(secret, base / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer.json is a link to .*id_rsa, outside"):
        merge_adapter(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (base / "tokenizer.json").unlink()
    (base / "additional_chat_templates").mkdir()
    os.symlink(secret, base / "additional_chat_templates" / "x.jinja")
    with pytest.raises(CheckpointError, match=r"additional_chat_templates/x.jinja is a link to"):
        merge_adapter(base, adapter, tmp_path / "merged")


def test_adapter_weights_linked_outside_are_refused(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(adapter / "adapter_model.safetensors", moved)
    os.symlink(moved, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is a link to"):
        load_peft_adapter(load_model(base), adapter)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[" * 100_000, "nested too deeply"),
        (b'{"peft_type": "\xff"}', "not UTF-8"),
        ('{"peft_type": "LORA", "r": 1e400, "lora_alpha": 4}', "field 'r' is missing or not a number"),
        ('{"peft_type": "LORA", "r": 2.5, "lora_alpha": 4}', "field 'r' must be a positive integer"),
        ('{"peft_type": "LORA", "r": -2, "lora_alpha": 4}', "field 'r' must be a positive integer"),
        ('{"peft_type": ["LORA"], "r": 2, "lora_alpha": 4}', "only LORA adapters"),
        ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [1, null]}', "target_modules must be"),
        ('{"peft_type": "LORA", "r": 2, "lora_alpha": 1' + "0" * 400 + "}", "wrong type"),
    ],
)
def test_malformed_adapter_config_is_one_line(base_and_adapter, tmp_path, capsys, text, needle):
    base, adapter = base_and_adapter
    p = adapter / "adapter_config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_adapter_metadata_of_the_wrong_type(base_and_adapter):
    from safetensors.torch import load_file, save_file

    base, adapter = base_and_adapter
    w = adapter / "adapter_model.safetensors"
    for meta, needle in (
        ("[" * 100_000, "not valid JSON"),
        ("[1]", "not a JSON object"),
        (json.dumps({"block_size": "big"}), "wrong type"),
    ):
        save_file(load_file(w), w, metadata={"format": "pt", "yunque.lora": meta})
        with pytest.raises(CheckpointError, match=needle):
            load_peft_adapter(load_model(base), adapter)
