import importlib.util
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lora_testing import perturb

from yunque.config import from_dict
from yunque.errors import CheckpointError, ConfigError
from yunque.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
)
from yunque.model import Transformer
from yunque.presets import get_preset


def tiny_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(get_preset("tiny", vocab_size=512, **kw))
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_equals_hand_computed_reference(rslora):
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=True)
    r, alpha = 8, 12.0
    lin = LoRALinear(base, r=r, alpha=alpha, use_rslora=rslora)
    assert lin.scale == pytest.approx(alpha / math.sqrt(r) if rslora else alpha / r)
    x = torch.randn(3, 5, 48)
    # Fresh adapter: B = 0, so the layer is exactly the base; A is kaiming-uniform (bound 1/sqrt(in)).
    assert torch.equal(lin(x), base(x))
    assert lin.lora_A.weight.abs().max() <= 1 / math.sqrt(48) and lin.lora_A.weight.std() > 0.3 / math.sqrt(48)
    assert torch.count_nonzero(lin.lora_B.weight) == 0
    A, B = torch.randn(r, 48), torch.randn(40, r)
    with torch.no_grad():
        lin.lora_A.weight.copy_(A)
        lin.lora_B.weight.copy_(B)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    ref = x @ base.weight.T + base.bias + scale * (x @ A.T @ B.T)
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.linear(x, lin.merged_weight(), base.bias), ref, rtol=1e-5, atol=1e-5)


def test_config_ranges_and_rules_are_errors_naming_the_field():
    for bad, field in [
        ({"r": 0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"block_size": 100}, "block_size"),
        ({"target_modules": []}, "target_modules"),
    ]:
        with pytest.raises(ConfigError, match=f"^{field}:"):
            from_dict(LoraConfig, bad)
        with pytest.raises(ConfigError, match=f"^{field}:"):
            LoraConfig(**bad)  # the Python API checks the same rules
    with pytest.raises(ConfigError, match="lora.r: must be > 0"):
        from_dict(LoraConfig, {"r": -1}, prefix="lora")
    with pytest.raises(ConfigError, match="lora.target_modules: must name at least one"):
        from_dict(LoraConfig, {"target_modules": []}, prefix="lora")  # a check in __post_init__ names where it sits
    m = tiny_model()
    with pytest.raises(ConfigError, match="^double_quant: only applies with quantize_base"):
        apply_lora(
            m, LoraConfig(double_quant=True)
        )  # settable (training sets quantize_base from the method), not appliable
    assert not lora_modules(m)
    with pytest.raises(ConfigError, match="'q_prj' selects no linear layer.*linear layers: .*q_proj"):
        apply_lora(tiny_model(), LoraConfig(target_modules=["q_proj", "q_prj"]))
    with pytest.raises(ConfigError, match="embed_tokens is a Embedding, not nn.Linear"):
        apply_lora(tiny_model(), LoraConfig(target_modules=["embed_tokens"]))


def test_apply_lora_wraps_targets_freezes_the_rest_and_keeps_outputs():
    m = tiny_model()
    x = torch.randint(0, 512, (2, 16))
    ref = m(x)
    total_before = sum(p.numel() for p in m.parameters())
    names = apply_lora(m, LoraConfig(r=4))
    L, d, f = 4, 128, 384
    kv = 2 * 32  # tiny preset: 2 kv heads of 32
    assert len(names) == 7 * L and all(isinstance(m.get_submodule(n), LoRALinear) for n in names)
    per_layer = 4 * ((d + d) + (d + kv) * 2 + (d + d)) + 4 * ((d + f) * 2 + (f + d))
    trainable, total = trainable_parameters(m)
    assert trainable == L * per_layer
    assert total == total_before + trainable
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in m.named_parameters())
    assert torch.equal(m(x), ref)  # B = 0 at init
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(m, LoraConfig())


def test_only_adapter_weights_get_gradients_and_dropout_zero_is_a_no_op():
    m = tiny_model()
    apply_lora(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb(m)
    assert all(mod.lora_dropout is None for mod in lora_modules(m).values())
    m.train()
    x = torch.randint(0, 512, (2, 16))
    m(x).logsumexp(-1).mean().backward()
    for n, p in m.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n


def test_frozen_base_does_no_weight_gradient_work():
    """LoRA is faster than full training because the base's weight gradients are never computed:
    count the FLOPs of forward + backward (deterministic, unlike timings on a shared machine)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, 512, (2, 64))

    def flops(m):
        m.train()
        with FlopCounterMode(display=False) as fc:
            m(x).logsumexp(-1).mean().backward()
        return fc.get_total_flops()

    full = flops(tiny_model(tie_word_embeddings=False))
    m = tiny_model(tie_word_embeddings=False)
    apply_lora(m, LoraConfig(r=8))
    lora = flops(m)
    # Linear layers: full = fwd + grad_x + grad_W = 3 units; LoRA = 2 units plus the small adapters.
    assert lora < 0.78 * full, lora / full


def test_dropout_applies_in_training_only():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(32, 32), r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    x = torch.randn(4, 32)
    lin.eval()
    ref = lin(x)
    assert torch.equal(lin(x), ref)
    lin.train()
    assert not torch.allclose(lin(x), ref)


def test_lora_state_dict_round_trip_and_strict_errors():
    m = tiny_model()
    apply_lora(m, LoraConfig(r=4, target_modules=["o_proj"]))
    perturb(m)
    sd = {k: v.clone() for k, v in lora_state_dict(m).items()}
    assert sorted(sd) == sorted(f"model.layers.{i}.self_attn.o_proj.lora_{p}.weight" for i in range(4) for p in "AB")
    m2 = tiny_model()
    apply_lora(m2, LoraConfig(r=4, target_modules=["o_proj"]))
    load_lora_state_dict(m2, sd)
    x = torch.randint(0, 512, (1, 8))
    assert torch.equal(m(x), m2(x))
    key = "model.layers.1.self_attn.o_proj.lora_B.weight"
    with pytest.raises(CheckpointError, match=f"tensor {key} is missing"):
        load_lora_state_dict(m2, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=f"tensor {key} has shape \\[128, 3\\], the model needs \\[128, 4\\]"):
        load_lora_state_dict(m2, {**sd, key: torch.zeros(128, 3)})
    with pytest.raises(CheckpointError, match="tensor model.layers.0.mlp.up_proj.lora_A.weight matches no LoRA module"):
        load_lora_state_dict(m2, {**sd, "model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 128)})


def test_merge_lora_folds_adapters_into_plain_linears():
    m = tiny_model()
    apply_lora(m, LoraConfig(r=8, alpha=16, use_rslora=True))
    perturb(m)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = m(x)
        merged = merge_lora(m)
        out = m(x)
    assert len(merged) == 28 and not lora_modules(m)
    assert all(type(mod) is nn.Linear for n, mod in m.named_modules() if n.endswith("_proj"))
    assert set(m.state_dict()) == set(tiny_model().state_dict())  # HF names again: save_model works as is
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - tiny_model()(x)).abs().max() > 1e-2  # the adapter really changed the model


def test_bf16_base_merges_to_bf16_and_runs_under_autocast():
    x = torch.randint(0, 512, (2, 8))
    ref = tiny_model()
    apply_lora(ref, LoraConfig(r=4))
    perturb(ref)
    m = tiny_model().to(torch.bfloat16)
    apply_lora(m, LoraConfig(r=4))
    perturb(m)
    assert lora_modules(m)["model.layers.0.mlp.up_proj"].lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        y32, y = ref(x), m(x).float()
        merge_lora(m)
        assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        out = m(x).float()
    # Merged in fp32, rounded once to bf16: no further from the fp32 model than the unmerged bf16 one.
    rel = lambda a: ((a - y32).norm() / y32.norm()).item()  # noqa: E731
    assert rel(out) < 1.25 * rel(y) and rel(y) < 0.1
    m32 = tiny_model()
    apply_lora(m32, LoraConfig(r=4))
    perturb(m32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m32(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert lora_modules(m32)["model.layers.0.mlp.up_proj"].lora_A.weight.grad.dtype == torch.float32


# ---- QLoRA: NF4 base (bitsandbytes kernels) ----

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="QLoRA needs the optional bitsandbytes dependency (yunque[qlora])",
)


def qlora_pair(double_quant=False, r=8):
    """The same adapter on a full-precision base and on its NF4 copy."""
    full, quant = tiny_model(), tiny_model()
    apply_lora(full, LoraConfig(r=r), generator=torch.Generator().manual_seed(3))
    apply_lora(
        quant,
        LoraConfig(r=r, quantize_base=True, double_quant=double_quant),
        generator=torch.Generator().manual_seed(3),
    )
    perturb(full, std=0.02)
    perturb(quant, std=0.02)
    return full, quant


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@needs_bnb
def test_qlora_forward_is_close_to_lora_on_full_precision():
    from yunque.quant import NF4Linear

    full, quant = qlora_pair()
    q = quant.model.layers[0].mlp.gate_proj.base
    assert isinstance(q, NF4Linear) and isinstance(quant.model.layers[0].mlp.gate_proj, LoRALinear)
    w = full.model.layers[0].mlp.gate_proj.base.weight
    w_err = rel_err(q.dequantize(), w)
    assert 0.05 < w_err < 0.12, w_err  # NF4 on Gaussian weights: ~9% relative error
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        a, b = quant(x), full(x)
    err = rel_err(a, b)
    print(f"QLoRA vs LoRA: weight rel err {w_err:.4f}, logits rel err {err:.4f}")
    assert 0 < err < 0.15
    # lm_head and embeddings stay full precision (as in bitsandbytes/transformers QLoRA)
    assert type(quant.lm_head) is nn.Linear or quant.config.tie_word_embeddings


@needs_bnb
def test_qlora_gradients_reach_only_adapters():
    _, quant = qlora_pair()
    quant.train()
    quant(torch.randint(0, 512, (2, 16))).logsumexp(-1).mean().backward()
    grads = {n for n, p in quant.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in quant.named_parameters() if "lora_" in n} and grads
    assert not any(b.requires_grad for b in quant.buffers())


@needs_bnb
@pytest.mark.parametrize("double_quant,lo,hi", [(False, 4.45, 4.6), (True, 4.1, 4.25)])
def test_nf4_storage_bits_per_param(double_quant, lo, hi):
    from yunque.quant import bits_per_param

    full, quant = qlora_pair(double_quant)
    bits = bits_per_param(quant)
    print(f"NF4 double_quant={double_quant}: {bits:.3f} bits/param")
    assert lo < bits < hi
    # No full-precision copy of a quantised weight is left behind.
    fp = sum(p.numel() for n, p in quant.named_parameters() if "lora_" not in n)
    assert fp == sum(p.numel() for n, p in quant.named_parameters() if "embed" in n or "norm" in n or "lm_head" in n)
    assert trainable_parameters(quant) == trainable_parameters(full)


@needs_bnb
def test_double_quant_matches_single_quant_closely():
    _, q1 = qlora_pair(False)
    _, q2 = qlora_pair(True)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert rel_err(q2(x), q1(x)) < 0.02
    # Our module's dequantisation is exactly bitsandbytes' with the state it returned when quantising.
    import bitsandbytes as bnb

    w = tiny_model().model.layers[1].self_attn.o_proj.weight
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(
        q2.model.layers[1].self_attn.o_proj.base.dequantize(), bnb.functional.dequantize_4bit(packed, state)
    )
    w1 = q1.model.layers[1].self_attn.o_proj.base.dequantize()
    w2 = q2.model.layers[1].self_attn.o_proj.base.dequantize()
    assert 0 < rel_err(w2, w1) < 0.01


@needs_bnb
def test_qlora_training_reduces_loss_and_merge_dequantises_to_original_dtype():
    m = tiny_model(tie_word_embeddings=False)
    with torch.no_grad():  # a frozen head at init scale caps logits near 2.5: let the adapters have room to learn
        m.lm_head.weight.normal_(0, 0.1)
    apply_lora(m, LoraConfig(r=8, quantize_base=True, double_quant=True), generator=torch.Generator().manual_seed(0))
    # A learnable task: each row counts up by a row-specific stride from a random start.
    start, stride = (
        torch.randint(0, 512, (4, 1), generator=torch.Generator().manual_seed(0)),
        torch.tensor([[1], [3], [5], [7]]),
    )
    x = (start + stride * torch.arange(33)) % 512
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
    m.train()
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print("QLoRA losses", [round(v, 3) for v in losses])
    assert losses[-1] < 0.5 * losses[0]
    m.eval()
    with torch.no_grad():
        ref = m(x)
        merge_lora(m)
        out = m(x)
    assert all(
        type(mod) is nn.Linear and mod.weight.dtype == torch.float32
        for n, mod in m.named_modules()
        if n.endswith("_proj")
    )
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@needs_bnb
def test_qlora_bf16_base_under_autocast():
    m = tiny_model().to(torch.bfloat16)
    apply_lora(m, LoraConfig(r=4, quantize_base=True))
    perturb(m, std=0.02)
    assert m.model.layers[0].self_attn.q_proj.base.orig_dtype == torch.bfloat16
    x = torch.randint(0, 512, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    assert lora_modules(m)["model.layers.0.self_attn.q_proj"].lora_B.weight.grad.dtype == torch.float32
    merge_lora(m)
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_linears_in_bf16_give_identical_bf16_autocast_steps(tied):
    """Storing frozen linears in bf16 is exact under bf16 autocast: same loss, same adapter gradients."""
    from yunque.lora import store_frozen_linears_
    from yunque.train.loss import CausalLMLoss

    runs = []
    for store in (False, True):
        m = tiny_model(tie_word_embeddings=tied).train()
        apply_lora(m, LoraConfig(r=4, alpha=8), generator=torch.Generator().manual_seed(0))
        perturb(m)  # non-zero B, so the adapters change the output
        if store:
            n = store_frozen_linears_(m, torch.bfloat16)
            assert n == 7 * m.config.num_hidden_layers + (0 if tied else 1)
            assert m.model.embed_tokens.weight.dtype == torch.float32
            assert (m.lm_head.weight.dtype == torch.float32) == tied
            assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            idx = torch.arange(48).view(2, 24)[:, :-1].reshape(-1)  # positions that predict ids[:, 1:]
            loss = CausalLMLoss(m)(ids, None, None, idx, ids[:, 1:].reshape(-1))
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].keys() == runs[1][1].keys()
    for k, g in runs[0][1].items():
        assert torch.equal(g, runs[1][1][k]), k


def test_cpu_dropout_mask_rate_scale_seed_and_gradient():
    from yunque.lora import LoRADropout

    d = LoRADropout(0.05).train()
    x = torch.ones(512, 576, requires_grad=True)
    torch.manual_seed(3)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.003, dropped  # 294,912 draws: 5 standard deviations is 0.002
    assert torch.all((y == 0) | (y == torch.tensor(1 / 0.95)))
    torch.manual_seed(3)
    assert torch.equal(d(x), y)  # torch's seed fixes the mask
    assert not torch.equal(d(x), y)  # and each call draws a new one
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes where the input did, scaled alike
    assert torch.equal(d.eval()(x), x)
    # independent masks per call: no two modules share one
    a, b = d.train()(torch.ones(4096)), d(torch.ones(4096))
    assert ((a == 0) & (b == 0)).float().mean().item() < 0.01
