"""A config.json is checked before anything is allocated: field types and ranges, and whether the
model fits this machine's memory (issue 24 item 6); shard indexes name files inside the model
directory only (item 8)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from hf_models import tiny_hf_model

from yunque.__main__ import main
from yunque.errors import CheckpointError
from yunque.formats.hf import load_model, read_config, save_model
from yunque.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits") / "m"
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    save_model(Transformer(cfg), d, max_shard_bytes=8 * 1024)
    return d


def _variant(model_dir, tmp_path, **change):
    d = tmp_path / "v"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _cli_error(capsys, *argv) -> str:
    t0 = time.monotonic()
    assert main(list(argv)) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"num_hidden_layers": 1_000_000}, "num_hidden_layers: 1000000 layers is more than"),
        ({"hidden_size": 1e9}, "hidden_size: expected an integer, got 1000000000.0"),
        ({"hidden_size": "16"}, "hidden_size: expected an integer, got '16'"),
        ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads: must be a positive integer, got 0"),
        ({"num_key_value_heads": 3}, "num_key_value_heads: 3 does not divide num_attention_heads 4"),
        ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None}, "3 does not divide hidden_size 16"),
        ({"head_dim": 5}, "head dimension 5 must be even"),
        ({"vocab_size": -4}, "vocab_size: must be a positive integer"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps: expected a number"),
        ({"rope_theta": [1]}, "rope_theta: expected a positive number"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings: expected true or false"),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8,
                    "low_freq_factor": 1,
                    "high_freq_factor": 1,
                    "original_max_position_embeddings": 64,
                }
            },
            "rope_scaling.high_freq_factor: must be a finite number > 1",
        ),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor: must be a finite number > 0"),
        ({"rope_scaling": "linear"}, "rope_scaling: expected an object"),
        ({"architectures": "LlamaForCausalLM"}, "architectures: expected a list of names"),
    ],
)
def test_bad_fields_are_one_line_naming_file_and_field(model_dir, tmp_path, capsys, change, needle):
    d = _variant(model_dir, tmp_path, **change)
    for cmd in (["inspect", str(d), "--no-hashes"], ["generate", "--model", str(d), "--prompt", "hi"]):
        err = _cli_error(capsys, *cmd)
        assert f"{d / 'config.json'}: " in err and needle in err, err


def test_config_json_that_is_not_an_object(model_dir, tmp_path):
    d = _variant(model_dir, tmp_path)
    for text, needle in (
        ("[1, 2]", "expected a JSON object"),
        ("[" * 100_000, "nested too deeply"),
        ('{"a": 1' + "0" * 5000 + "}", "invalid JSON"),
    ):
        (d / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=needle):
            read_config(d)
    (d / "config.json").write_bytes(b'{"architectures": ["\xff"]}')
    with pytest.raises(CheckpointError, match="not UTF-8"):
        read_config(d)


def test_a_model_too_large_for_memory_is_refused_before_allocation(model_dir, tmp_path, monkeypatch):
    d = _variant(model_dir, tmp_path, vocab_size=1 << 30)  # 2^30 x 16 x 2 (untied) fp32: 128 GiB
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'config.json'}: the model has ") and "128.0 GiB" in msg and "memory" in msg
    # the same check against a machine with less memory than this small model needs
    from yunque.formats import model_limits

    monkeypatch.setattr(model_limits, "physical_memory", lambda: 1000)
    with pytest.raises(CheckpointError, match="more than this machine's 0.0 GiB"):
        load_model(model_dir)


def test_inspect_counts_parameters_without_building_the_model(model_dir, tmp_path, capsys, monkeypatch):
    from yunque.formats.model_limits import parameter_count

    d = _variant(model_dir, tmp_path, num_hidden_layers=4000, vocab_size=1 << 26)
    monkeypatch.setattr(Transformer, "__init__", lambda *a, **k: pytest.fail("inspect built the model"))
    t0 = time.monotonic()
    assert main(["inspect", str(d), "--no-hashes"]) == 0
    assert time.monotonic() - t0 < 20
    assert f"{parameter_count(read_config(d)) / 1e6:.2f}M parameters" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llama-gqa", "llama-tied", "llama-bias", "qwen2", "mistral", "llama3-rope"])
def test_parameter_count_is_exact(family, tmp_path):
    from yunque.formats.model_limits import parameter_count

    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path / family)
    cfg = read_config(tmp_path / family)
    with torch.device("meta"):
        built = sum(p.numel() for p in Transformer(cfg).parameters())
    assert parameter_count(cfg) == built == sum(p.numel() for p in hf.parameters())


def test_pretrain_overrides_are_checked_before_the_model_is_built(tmp_path):
    from train_util import make_corpus, pretrain_cfg, write_cfg

    corpus = make_corpus(tmp_path / "c", n_lines=40)
    for change, needle in (
        ({"num_hidden_layers": 1_000_000}, "num_hidden_layers: 1000000 layers"),
        ({"num_attention_heads": 0}, "num_attention_heads: must be a positive integer"),
        ({"hidden_size": 1e9}, "hidden_size: expected an integer"),
        ({"intermediate_size": 1 << 26, "num_hidden_layers": 64}, "need"),
        ({"vocab_size": 10}, "vocab_size: 10 is below the tokenizer's"),
    ):
        cfg = pretrain_cfg(corpus, tmp_path / "out", model={"overrides": change})
        path = write_cfg(tmp_path / "t.yaml", cfg)
        from yunque.config import load_config
        from yunque.errors import ConfigError
        from yunque.recipes.train import dry_run
        from yunque.train.config import TrainConfig

        with pytest.raises(ConfigError, match=needle):
            dry_run(load_config(TrainConfig, path))


# ---------------------------------------------------------------- item 8: shard indexes


def _index(d, weight_map):
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_shard_index_cannot_name_files_outside_the_model(model_dir, tmp_path, capsys):
    d = _variant(model_dir, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    first = next(iter(index))
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(d / index[first], outside)
    for bad in ("../elsewhere.safetensors", str(outside), "/etc/passwd", "", "x" * 5000, "a/" + "y" * 300):
        _index(d, {**index, first: bad})
        err = _cli_error(capsys, "inspect", str(d), "--no-hashes")
        assert "points outside" in err or "not a non-empty string" in err or "is too long" in err, err
        assert "root:" not in err
    # a symlink inside the directory that leads out of it
    os.symlink(outside, d / "evil.safetensors")
    _index(d, {**index, first: "evil.safetensors"})
    err = _cli_error(capsys, "inspect", str(d), "--no-hashes")
    assert "is a link to" in err and str(outside) in err


def test_single_file_symlink_out_of_the_directory_is_refused(model_dir, tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    shutil.copy(model_dir / "config.json", d / "config.json")
    m = load_model(model_dir)
    save_model(m, tmp_path / "one")
    os.symlink(tmp_path / "one" / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CheckpointError, match="is a link to"):
        load_model(d)


def test_hugging_face_cache_snapshots_still_load(model_dir, tmp_path):
    """The HF cache keeps files in blobs/ and links them from snapshots/<rev>/: that layout is allowed."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    m = load_model(snap)
    assert torch.equal(m.lm_head.weight, load_model(model_dir).lm_head.weight)


@pytest.mark.parametrize(
    "index_text, needle",
    [
        ("{}", "invalid shard index"),
        ('{"weight_map": [1]}', "invalid shard index"),
        ('{"weight_map": {"a": 3}}', "invalid shard index"),
        ("[" * 50_000, "nested too deeply"),
    ],
)
def test_malformed_shard_index_is_one_line(model_dir, tmp_path, capsys, index_text, needle):
    d = _variant(model_dir, tmp_path)
    (d / "model.safetensors.index.json").write_text(index_text)
    assert needle in _cli_error(capsys, "inspect", str(d), "--no-hashes")
