"""DP-SGD: the accountant is Opacus', clipping bounds every record's gradient, the DP step without noise
or clipping is normal training, resume continues loss and ε exactly, max_epsilon stops the run."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from train_util import TINY_MODEL, deep_update, make_corpus, one_thread

from yunque.config import from_dict
from yunque.errors import ConfigError
from yunque.lora import LoraConfig, apply_lora
from yunque.model import ModelConfig, Transformer
from yunque.train.config import TrainConfig
from yunque.train.loss import CausalLMLoss
from yunque.train.packing import ArraySource
from yunque.train.step import to_device, train_step

_one_thread = pytest.fixture(autouse=True)(one_thread)
pytest.importorskip("opacus")


def tiny_model(vocab: int = 96, seed: int = 0) -> Transformer:
    m = Transformer(ModelConfig(vocab_size=vocab, max_position_embeddings=128, **TINY_MODEL))
    m.init_weights(generator=torch.Generator().manual_seed(seed))
    return m


def lora_model(seed: int = 0, **lora) -> Transformer:
    m = tiny_model(seed=seed)
    apply_lora(m, LoraConfig(r=4, alpha=8, **lora), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B is zero at init: every A gradient would be zero too
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=g)
    return m


def docs(n: int, lengths=(5, 30), vocab: int = 96, seed: int = 0, masked: bool = True):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(*lengths)) if isinstance(lengths, tuple) else lengths
        ids = rng.integers(3, vocab, L).tolist()
        mask = (np.arange(L) >= L // 3).tolist() if masked else None  # a masked "prompt", like SFT records
        out.append((ids, mask))
    return ArraySource.from_docs(out)


def dp_config(method="lora", **privacy) -> TrainConfig:
    cfg = {
        "method": method,
        "model": {"path": "unused"},
        "data": {"train": ["unused.jsonl"], "seq_len": 64},
        "micro_batch": 2,
        "grad_accum": 2,
        "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 11, "accountant": "rdp", **privacy},
    }
    return from_dict(TrainConfig, cfg)


def dp_for(model, source, method="lora", **privacy):
    from yunque.train.privacy import DPTraining

    return DPTraining(dp_config(method, **privacy), source, model, torch.device("cpu"), 0)


# ---------------------------------------------------------------- accounting


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_accountant_epsilon_equals_opacus(mechanism):
    from opacus.accountants import PRVAccountant, RDPAccountant

    from yunque.train.privacy import Accountant

    for q, sigma, steps in ((0.01, 1.1, 300), (0.05, 0.8, 120)):
        ours, theirs = Accountant(mechanism, 1e-5), (RDPAccountant if mechanism == "rdp" else PRVAccountant)()
        for _ in range(steps):
            ours.step(sigma, q)
            theirs.step(noise_multiplier=sigma, sample_rate=q)
        want = theirs.get_epsilon(delta=1e-5)
        assert ours.epsilon() == pytest.approx(want, rel=1e-12)
        assert 0 < want < 50
        # the same steps as "so far + more" (what the max_epsilon search and a resumed run ask)
        head = Accountant(mechanism, 1e-5)
        for _ in range(steps // 3):
            head.step(sigma, q)
        assert head.epsilon((sigma, q, steps - steps // 3)) == pytest.approx(want, rel=1e-9)


def test_target_epsilon_sets_the_noise_that_ends_the_run_there():
    src = docs(400)
    dp = dp_for(lora_model(), src, noise_multiplier=None, target_epsilon=3.0)
    dp.plan(150)
    assert 2.98 <= dp.final_epsilon <= 3.0
    assert dp.sigma > 0.3
    assert dp.delta == pytest.approx(400**-1.1)


def test_max_epsilon_plans_the_last_step_within_budget():
    dp = dp_for(lora_model(), docs(400), noise_multiplier=0.7, max_epsilon=2.0)
    dp.plan(500)
    k = dp.stop_step
    assert k is not None and 0 < k < 500
    eps = dp.accountant.epsilon
    assert eps((dp.sigma, dp.q, k)) <= 2.0 < eps((dp.sigma, dp.q, k + 1))


def test_privacy_section_loads_strictly_from_yaml(tmp_path):
    from yunque.config import load_config

    p = tmp_path / "c.yaml"
    head = "method: lora\nmodel: {path: m}\ndata: {train: [x]}\nprivacy:\n  target_epsilon: 3\n  delta: 1e-5\n"
    p.write_text(head)
    cfg = load_config(TrainConfig, p)
    assert cfg.privacy.enabled and cfg.privacy.delta == 1e-5 and cfg.privacy.accountant == "prv"
    p.write_text(head + "  noise: 1.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml:7: privacy.noise: unknown key"):
        load_config(TrainConfig, p)
    p.write_text(head + "  noise_multiplier: 1.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml:7: privacy.noise_multiplier: give target_epsilon or"):
        load_config(TrainConfig, p)
    assert not load_config(TrainConfig, None, ["method=lora", "model.path=m", "data.train=[x]"]).privacy.enabled


def test_privacy_config_is_strict():
    with pytest.raises(ConfigError, match="privacy.noise_multiplier: give target_epsilon or noise_multiplier"):
        dp_config(target_epsilon=3.0)
    with pytest.raises(ConfigError, match="privacy.max_grad_norm"):
        dp_config(max_grad_norm=0.0)
    with pytest.raises(ConfigError, match="privacy.max_epsilon: needs"):
        from_dict(TrainConfig, {"model": {"preset": "tiny"}, "tokenizer": "t", "privacy": {"max_epsilon": 3}})
    with pytest.raises(ConfigError, match="not pretrain"):
        from_dict(
            TrainConfig,
            {
                "model": {"preset": "tiny"},
                "tokenizer": "t",
                "data": {"train": ["x"]},
                "privacy": {"noise_multiplier": 1},
            },
        )
    with pytest.raises(ConfigError, match="privacy.accountant"):
        dp_config(accountant="gdp")
    with pytest.raises(ConfigError, match="privacy.delta: .* is not below 1/n"):
        dp_for(lora_model(), docs(50), delta=0.05)


# ---------------------------------------------------------------- per-record gradients and clipping


def direct_grads(model, source, i):
    """Record i's gradient of its mean token loss, by plain autograd on the record alone."""
    from yunque.train.privacy import record_rows

    params = [p for p in model.parameters() if p.requires_grad]
    b, _ = record_rows(source, np.array([i]), 64, 0)
    db = to_device(b, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    loss = CausalLMLoss(model)(db.input_ids, db.positions, db.mask, db.target_idx, db.targets)
    (loss / len(db.targets)).backward()
    out = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("method,per_sample", [("lora", "hooks"), ("lora", "loop"), ("full", "loop")])
def test_clipping_bounds_every_per_record_gradient(method, per_sample):
    from yunque.train.privacy import record_rows

    model = lora_model() if method == "lora" else tiny_model()
    src = docs(6)
    dp = dp_for(model, src, method, per_sample=per_sample, max_grad_norm=0.05)
    assert dp.grads.name == per_sample
    refs = [direct_grads(model, src, i) for i in range(len(src))]
    ref_norms = [float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gs]))) for gs in refs]
    assert min(ref_norms) > 0.05  # every record is clipped, so the bound is what is tested
    module, C = CausalLMLoss(model), 0.05
    # each record alone: the engine's clipped contribution has norm <= C, in the direction of its gradient
    for i, ref in enumerate(refs):
        acc = [torch.zeros_like(p, dtype=torch.float32) for p in dp.params]
        b, lengths = record_rows(src, np.array([i]), 64, 0)
        _, _, norms = dp.grads.add_clipped(module, b, lengths, torch.device("cpu"), "fp32", acc, C)
        assert float(norms[0].detach()) == pytest.approx(ref_norms[i], rel=1e-4)
        got = float(torch.linalg.vector_norm(torch.stack([a.norm() for a in acc])))
        assert got <= C * (1 + 1e-6)
        assert got == pytest.approx(C, rel=1e-4)
        for a, g in zip(acc, ref):
            torch.testing.assert_close(a, g * (C / (ref_norms[i] + 1e-6)), rtol=1e-4, atol=1e-7)
    # all at once (rows padded to the longest): the sum of the clipped gradients
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in dp.params]
    b, lengths = record_rows(src, np.arange(len(src)), 64, 0)
    dp.grads.add_clipped(module, b, lengths, torch.device("cpu"), "fp32", acc, C)
    for k, a in enumerate(acc):
        want = sum(ref[k] * (C / (n + 1e-6)) for ref, n in zip(refs, ref_norms))
        torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in dp.params)  # nothing left for the optimizer but what the DP step sets


def test_hooks_are_refused_where_they_cannot_see_each_record():
    with pytest.raises(ConfigError, match="dropout"):
        dp_for(lora_model(dropout=0.1), docs(60), per_sample="hooks")
    assert dp_for(lora_model(dropout=0.1), docs(60)).grads.name == "loop"  # auto
    with pytest.raises(ConfigError, match="full fine-tuning"):
        dp_for(tiny_model(), docs(60), "full", per_sample="hooks")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_no_noise_and_no_clipping_is_normal_training(method):
    """sigma 0, clipping off, the same records: the DP step is train_step (records of equal trained length,
    where the mean of per-record means is the token mean)."""
    from yunque.train.privacy import record_rows

    src = docs(16, lengths=12, masked=False)
    base = lora_model() if method == "lora" else tiny_model()
    m_dp, m_ref = copy.deepcopy(base), copy.deepcopy(base)
    dp = dp_for(m_dp, src, method, noise_multiplier=0.0, max_grad_norm=0.0)
    mod_dp, mod_ref = CausalLMLoss(m_dp), CausalLMLoss(m_ref)
    # SGD: AdamW's first steps divide each gradient by its own size, so a gradient near zero that differs in the
    # last bits (a sum in another order) moves its weight by up to lr: equal gradients are what is checked.
    opt_dp = torch.optim.SGD([p for p in mod_dp.parameters() if p.requires_grad], lr=0.5)
    opt_ref = torch.optim.SGD([p for p in mod_ref.parameters() if p.requires_grad], lr=0.5)
    params_ref = [p for p in mod_ref.parameters() if p.requires_grad]
    for step in range(3):
        idx = np.arange(4 * step, 4 * step + 4)
        dp.sample = lambda s, idx=idx: idx
        r = dp.step(step, mod_dp, opt_dp, precision="fp32")
        micro = [to_device(record_rows(src, idx[k : k + 2], 64, 0)[0], torch.device("cpu")) for k in (0, 2)]
        n = sum(len(m.targets) for m in micro)
        loss_ref, _ = train_step(
            mod_ref, opt_ref, micro, n, world=1, precision="fp32", grad_clip=0.0,
            no_sync=lambda skip: __import__("contextlib").nullcontext(), params=params_ref,
        )  # fmt: skip
        assert r.n_targets == n
        assert float(r.loss_sum) / n == pytest.approx(float(loss_ref) / n, rel=1e-6)
    for (name, a), b in zip(m_dp.named_parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert dp.epsilon() == math.inf


# ---------------------------------------------------------------- the training loop


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from yunque.formats.hf import save_model
    from yunque.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("dp")
    corpus = make_corpus(d / "corpus")
    tok = Tokenizer.from_dir(corpus["tok"])
    m = tiny_model(vocab=tok.vocab_size)
    with torch.no_grad():
        m.lm_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    save_model(m, d / "base")
    tok.save(d / "base")
    return corpus, d / "base"


def run_cfg(corpus, base, out, **kw) -> TrainConfig:
    cfg = {
        "method": "lora",
        "out_dir": str(out),
        "seed": 3,
        "model": {"path": str(base)},
        "data": {"train": [str(corpus["sft"])], "val_fraction": 0.1, "seq_len": 64},
        "micro_batch": 4,
        "grad_accum": 2,
        "max_steps": 6,
        "optim": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0},
        "lora": {"r": 4, "alpha": 8},
        "eval": {"every": 3},
        "checkpoint": {"every": 3, "keep_last": 2},
        "log": {"every": 1, "plot": False},
        "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 5, "accountant": "rdp"},
    }
    return from_dict(TrainConfig, deep_update(cfg, kw))


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_dp_run_logs_epsilon_writes_it_and_resumes_exactly(base, tmp_path):
    from yunque.recipes.train import train

    corpus, b = base
    secret = {"privacy": {"seed": None}}  # the sampling and noise secret is drawn at the start, kept in checkpoints
    ref = train(run_cfg(corpus, b, tmp_path / "ref", **secret))
    priv = [r for r in rows(tmp_path / "ref") if r["kind"] == "privacy"]
    assert [r["step"] for r in priv] == [3, 6]
    assert 0 < priv[0]["epsilon"] < priv[1]["epsilon"]
    assert all(0 <= r["clipped"] <= 1 and 0 < r["records_per_step"] < 20 for r in priv)  # expected batch 8
    run = json.loads((tmp_path / "ref" / "run.json").read_text())
    assert run["privacy"]["epsilon"] == pytest.approx(priv[1]["epsilon"])
    assert run["privacy"]["steps"] == 6 and "secret" not in json.dumps(run)
    card = (tmp_path / "ref" / "adapter" / "README.md").read_text()
    assert f"ε = {priv[1]['epsilon']:.3f}" in card
    # interrupted after step 3: the checkpoint holds the accountant's history and the sampling secret
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-00000003", out / "checkpoints" / "step-00000003")
    shutil.copy(tmp_path / "ref" / "metrics.jsonl", out / "metrics.jsonl")
    got = train(run_cfg(corpus, b, out, resume="auto", **secret))
    assert len(got.losses) == len(ref.losses) == 6
    assert max(abs(x - y) for x, y in zip(got.losses, ref.losses)) <= 1e-6
    assert got.privacy["epsilon"] == ref.privacy["epsilon"]
    assert [r["epsilon"] for r in rows(out) if r["kind"] == "privacy"] == [r["epsilon"] for r in priv]


def test_max_epsilon_stops_the_run_cleanly(base, tmp_path):
    from yunque.recipes.train import train

    corpus, b = base
    cfg = run_cfg(corpus, b, tmp_path / "run", max_steps=40, privacy={"max_epsilon": 1.0})
    r = train(cfg)
    assert 0 < r.steps < 40
    assert r.privacy["stopped_at_budget"] and r.privacy["epsilon"] <= 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    stop = [x for x in rows(tmp_path / "run") if x["kind"] == "privacy" and x.get("action") == "stop"]
    assert stop and stop[0]["step"] == r.steps


def test_dry_run_prints_noise_sampling_steps_and_final_epsilon(base, tmp_path):
    from yunque.recipes.train import dry_run

    corpus, b = base
    text = dry_run(run_cfg(corpus, b, tmp_path / "run", max_steps=0, epochs=2.0))
    line = next(x for x in text.splitlines() if x.startswith("privacy: DP-SGD"))
    assert "noise multiplier 1" in line and "sampling rate 0.037" in line and "54 steps" in line  # 216 records, q 8/216
    assert "ε at the end" in text and "one record per row" in text
