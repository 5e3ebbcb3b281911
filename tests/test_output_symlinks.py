"""Training never writes through a symlink planted in its out_dir (issue 24 item 8): metrics.jsonl,
run.json, the loss plot, the exported model's files and the checkpoint folder."""

from __future__ import annotations

import os

import pytest

from yunque.errors import CheckpointError, ConfigError
from yunque.train.tracking import Tracker, plot_metrics


@pytest.fixture
def victim(tmp_path):
    p = tmp_path / "victim.txt"
    p.write_text("precious\n")
    return p


def test_metrics_symlink_is_refused_and_its_target_kept(tmp_path, victim):
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim, out / "metrics.jsonl")
    for resume in (None, 3):
        with pytest.raises(ConfigError, match="metrics.jsonl: is a symlink"):
            Tracker(out, resume_step=resume)
    assert victim.read_text() == "precious\n"


def test_plot_replaces_planted_links_instead_of_following_them(tmp_path, victim):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    out.mkdir()
    t = Tracker(out)
    t.log(1, "train", {"loss": 2.0, "lr": 1e-3})
    t.log(2, "train", {"loss": 1.5, "lr": 1e-3})
    t.close()
    os.symlink(victim, out / "loss.tmp.png")  # the old fixed temporary name
    os.symlink(victim, out / "loss.png")
    plot_metrics(out / "metrics.jsonl", out / "loss.png")
    assert victim.read_text() == "precious\n"
    assert not (out / "loss.png").is_symlink() and (out / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_checkpoint_folder_symlink_is_refused(tmp_path):
    import torch

    from yunque.train.checkpoint import save_checkpoint

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "step-00000001").mkdir(parents=True)
    (elsewhere / "step-00000001" / "state.json").write_text("{}")
    os.symlink(elsewhere, tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="checkpoints: is a symlink"):
        save_checkpoint(tmp_path / "checkpoints", 2, {"model": {"w": torch.zeros(2)}}, {}, keep_last=1)
    assert (elsewhere / "step-00000001" / "state.json").is_file()  # not swept as an old checkpoint


def test_training_outputs_never_follow_planted_links(tmp_path, victim):
    from train_util import make_corpus, pretrain_cfg

    from yunque.config import from_dict
    from yunque.recipes.train import train
    from yunque.train.config import TrainConfig

    corpus = make_corpus(tmp_path / "c", n_lines=60)
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    for name in ("run.tmp", "run.json", "loss.tmp.png", "model/tokenizer.json", "model/tokenizer_config.json"):
        os.symlink(victim, out / name)
    cfg = pretrain_cfg(
        corpus,
        out,
        max_steps=2,
        eval={"every": 0},
        checkpoint={"every": 0},
        log={"plot": True},
        model={"overrides": {"num_hidden_layers": 1}},
    )
    r = train(from_dict(TrainConfig, cfg))
    assert victim.read_text() == "precious\n"
    assert r.run_json == out / "run.json" and not (out / "run.json").is_symlink()
    assert (
        not (out / "model" / "tokenizer.json").is_symlink() and (out / "model" / "tokenizer.json").stat().st_size > 100
    )
