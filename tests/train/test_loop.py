"""The loop: it learns, accumulation equals a big batch, early stopping keeps the best, outputs load in transformers."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from train_util import make_corpus, one_thread, pretrain_cfg

from yunque.config import from_dict
from yunque.recipes.train import train
from yunque.train.config import TrainConfig
from yunque.train.loss import linear_cross_entropy
from yunque.train.step import lr_at, param_groups

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _cfg(corpus, out, **kw) -> TrainConfig:
    return from_dict(TrainConfig, pretrain_cfg(corpus, out, **kw))


def test_linear_cross_entropy_matches_reference(monkeypatch):
    import yunque.train.loss

    monkeypatch.setattr(
        yunque.train.loss, "_chunk_rows", lambda vocab, itemsize: 128
    )  # 300 rows: chunks of 128, 128, 44
    torch.manual_seed(0)
    h = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1000, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 1000, (300,))
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    gh, gw = torch.autograd.grad(ref * 0.37, (h, w))
    got = linear_cross_entropy(h, w, y)
    dh, dw = torch.autograd.grad(got * 0.37, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(dh, gh, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dw, gw, rtol=1e-9, atol=1e-11)
    with torch.no_grad():  # evaluation path computes no gradients but the same loss
        torch.testing.assert_close(linear_cross_entropy(h, w, y), ref)


@pytest.mark.parametrize("chunked", [False, True])
def test_linear_cross_entropy_bf16_matches_autocast_reference(monkeypatch, chunked):
    """Under bf16 autocast: logits in bf16, softmax in fp32, d logits rounded once to bf16 (as autograd does).

    chunked: 3 chunks, and each chunk's bf16 weight gradient added to the fp32 one 100 rows at a time."""
    import yunque.train.loss

    if chunked:
        monkeypatch.setattr(yunque.train.loss, "_chunk_rows", lambda vocab, itemsize: 128)
        monkeypatch.setattr(yunque.train.loss, "_ADD_SLICE", 64 * 100)
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = (torch.randn(3000, 64) * 0.3).requires_grad_()
    y = torch.randint(0, 3000, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), y, reduction="sum")
        got = linear_cross_entropy(h, w, y)
    gh, gw = torch.autograd.grad(ref, (h, w))
    dh, dw = torch.autograd.grad(got, (h, w))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dh, gh, rtol=2e-2, atol=2e-3)
    if not chunked:
        torch.testing.assert_close(dw, gw, rtol=2e-2, atol=2e-3)
    else:  # per-chunk bf16 sums round elsewhere than one bf16 sum: as close to the exact gradient
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        exact = torch.autograd.grad(F.cross_entropy(h64 @ w64.t(), y, reduction="sum"), w64)[0]
        assert (dw.double() - exact).abs().max() <= 1.5 * (gw.double() - exact).abs().max()


def test_linear_cross_entropy_backward_runs_once():
    """Its gradients are scaled in place (no second (V, D) buffer), so a retained graph cannot be reused."""
    h = torch.randn(20, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.randint(0, 50, (20,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_optimizer_groups_and_schedule():
    from yunque.model import Transformer
    from yunque.presets import get_preset

    m = Transformer(get_preset("tiny", vocab_size=64, tie_word_embeddings=False, attention_bias=True))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert (
        "model.embed_tokens.weight" in nd and "model.norm.weight" in nd and "model.layers.0.self_attn.q_proj.bias" in nd
    )
    assert all(n.endswith("proj.weight") or n == "lm_head.weight" for n in (names[id(p)] for p in decay["params"]))
    kw = dict(lr=1.0, warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)


def test_loss_goes_down_and_outputs(tmp_path, data):
    cfg = _cfg(data, tmp_path / "run", max_steps=36, log={"plot": True}, eval={"every": 12}, optim={"lr": 6e-3})
    r = train(cfg)
    ls = r.losses
    assert len(ls) == 36 and all(math.isfinite(x) for x in ls)
    assert ls[0] > 5.0  # ~ln(vocab) at random init
    assert sum(ls[-5:]) / 5 < 0.45 * sum(ls[:5]) / 5  # the cyclic corpus is learnable
    assert r.final["val_loss"] < 2.5 and r.final["val_bpb"] < 1.0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["seed"] == 7 and run["config"]["optim"]["lr"] == 6e-3 and run["packages"]["torch"]
    assert run["final_metrics"]["val_loss"] == pytest.approx(r.final["val_loss"])
    for rel, digest in run["files_sha256"].items():
        assert hashlib.sha256((tmp_path / "run" / rel).read_bytes()).hexdigest() == digest
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "metrics.jsonl", "loss.png"} <= set(
        run["files_sha256"]
    )
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm"} <= set(rows[0]) and sum(r["kind"] == "eval" for r in rows) == 3

    # The HF directory loads in transformers with identical logits.
    transformers = pytest.importorskip("transformers")
    from yunque.formats.hf import load_model

    ours = load_model(tmp_path / "run" / "model").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_equals_big_batch(tmp_path, data):
    """accum 4 x micro 2 == micro 8 on masked SFT data whose micro-batches hold different token counts."""
    common = dict(
        max_steps=4,
        data={"train": [str(data["sft"])], "val_fraction": 0.0, "seq_len": 48, "pack": "whole"},
        eval={"every": 0},
        checkpoint={"every": 0},
        optim={"grad_clip": 0.0},
    )
    big = _cfg(data, tmp_path / "big", micro_batch=8, grad_accum=1, **common)
    acc = _cfg(data, tmp_path / "acc", micro_batch=2, grad_accum=4, **common)
    from yunque.train.loop import Trainer

    t_big, t_acc = Trainer(big, quiet=True), Trainer(acc, quiet=True)
    counts = [t_acc.packer.next_batch(2).num_targets for _ in range(4)]
    assert len(set(counts)) > 1  # uneven micro-batches: per-micro-batch means would NOT match
    t_acc.packer.load_state_dict({"epoch": 0, "cursor": 0, "offset": 0, "rows": 0, "truncated": 0})
    r_big, r_acc = t_big.run(), t_acc.run()
    for a, b in zip(r_big.losses, r_acc.losses):
        assert abs(a - b) <= 1e-6
    for (n, p), q in zip(t_big.model.named_parameters(), t_acc.model.parameters()):
        # Adam divides by sqrt(v): where a gradient is near eps, fp32 summation-order noise moves a
        # weight by up to ~1e-6 (seen 2.6e-7..1.1e-6). Per-micro-batch means would move it by ~lr (3e-3).
        assert (p - q).abs().max() <= 1e-5, n


def test_gradient_checkpointing_and_bf16(tmp_path, data):
    base = _cfg(data, tmp_path / "a", max_steps=5, eval={"every": 0})
    ckpt = _cfg(data, tmp_path / "b", max_steps=5, eval={"every": 0}, grad_checkpointing=True)
    la, lb = train(base).losses, train(ckpt).losses
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-6
    bf = train(_cfg(data, tmp_path / "c", max_steps=30, precision="bf16", eval={"every": 0}))
    assert all(math.isfinite(x) for x in bf.losses)
    assert max(abs(x - y) for x, y in zip(la, bf.losses[:5])) < 0.1  # same run, bf16 rounding only
    assert sum(bf.losses[-5:]) < 0.6 * sum(bf.losses[:5])


def test_early_stopping_keeps_and_reports_best(tmp_path, data):
    # min_delta larger than any possible gain: the first eval is the best, two more without improvement stop it.
    cfg = _cfg(
        data,
        tmp_path / "run",
        max_steps=100,
        eval={"every": 4, "patience": 2, "min_delta": 100.0},
        checkpoint={"every": 2, "keep_last": 1},
    )
    r = train(cfg)
    assert r.stopped_early and r.steps == 12 and r.best_step == 4
    assert r.best_checkpoint == tmp_path / "run" / "checkpoints" / "step-00000004"
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000004", "step-00000012"]  # the best survives keep_last=1
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["stopped_early"] and run["best_step"] == 4 and run["best_metrics"]["val_loss"] == r.best["val_loss"]

    # A real improvement threshold: stops only when the loss stalls (min_delta=0 never stops on this short run).
    r2 = train(_cfg(data, tmp_path / "run2", max_steps=16, eval={"every": 4, "patience": 2, "min_delta": 0.0}))
    assert not r2.stopped_early and r2.best_step == 16


def test_rerun_refused_overwrite_starts_over_warmup_ratio_and_warnings(tmp_path, data, capsys):
    from yunque.errors import ConfigError

    run = tmp_path / "run"
    first = _cfg(data, run, max_steps=6, checkpoint={"every": 2, "keep_last": 5}, eval={"every": 0})
    train(first)
    with pytest.raises(ConfigError, match=r"out_dir: .* holds checkpoint .*step-00000006 .*--resume.*--overwrite"):
        train(first)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="out_dir: "):
        train(_cfg(data, run, max_steps=6, checkpoint={"every": 2, "keep_last": 5}, eval={"every": 0}, resume="never"))
    assert (run / "metrics.jsonl").read_text() == before and before.count('"kind": "train"') == 6  # kept as it was
    capsys.readouterr()
    r = train(
        _cfg(
            data,
            run,
            max_steps=8,
            overwrite=True,
            optim={"warmup_steps": None, "warmup_ratio": 0.25},
            checkpoint={"every": 4, "keep_last": 5},
            eval={"every": 10},
        )
    )
    assert r.steps == 8
    # The earlier run's step 6 is gone, so a later --resume cannot continue from it.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if x["kind"] == "train"]
    assert [x["step"] for x in train_rows] == list(range(1, 9))
    assert train_rows[0]["lr"] == pytest.approx(3e-3 / 2) and train_rows[1]["lr"] == pytest.approx(3e-3)  # 25% of 8: 2
    err = capsys.readouterr().err
    assert "warning: eval.every: 10 but the run has 8 steps" in err


def test_outputs_does_not_import_the_loop():
    """outputs takes explicit arguments: no import of the loop, not even inside a function or for type checking."""
    import ast

    import yunque.train.outputs as outputs

    tree = ast.parse(open(outputs.__file__, encoding="utf-8").read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "yunque.train" in imported and "yunque.train.loop" not in imported
