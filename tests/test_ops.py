"""The memory-lean RMSNorm, SwiGLU and saved-as-recipe activations: same outputs and gradients as the plain
ops, fewer saved tensors."""

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from yunque.lora import LoraConfig, apply_lora
from yunque.model import Transformer, rope_cos_sin
from yunque.ops import rms_norm, saved_as_recipe, swiglu
from yunque.presets import get_preset

try:
    from yunque import cpu as yunque_cpu
    from yunque.cpu import kernels as cpu_kernels
except ImportError:  # yunque/cpu/ deleted: PyTorch's ops only
    yunque_cpu = cpu_kernels = None


def _ref_rms_norm(x, w, eps, out_dtype=None):
    h = x.float()
    return (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)).to(out_dtype or x.dtype)


@pytest.fixture(params=[False, True], ids=["torch-ops", "cpu-kernels"])
def kernels(request, monkeypatch):
    """Both implementations: PyTorch's ops (bit-identical to the plain formulas) and the fused CPU kernels."""
    if request.param and (cpu_kernels is None or cpu_kernels._lib() is None):
        pytest.skip("needs yunque/cpu/, an AVX512-BF16 CPU and g++")
    if not request.param and yunque_cpu is not None:
        monkeypatch.setattr(yunque_cpu, "enabled", lambda: False)
    return request.param


def _close(a, b, dtype):
    """Equal up to the kernels' exp and summation order: fp32 at 1e-6 of the norm; in bf16 at most one
    element in 10^3 off, by one rounding."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if dtype == torch.float32 or a.dtype == torch.float32:
        assert ((a - b).norm() / b.norm()).item() < 1e-6
    else:
        off = a != b
        assert off.float().mean().item() < 1e-3
        assert ((a.float() - b.float()).abs()[off] <= b.float().abs()[off] * 2**-7).all()


def test_swiglu_gradcheck_float64():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (a, b))


@pytest.mark.parametrize(
    "dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)]
)  # the last: under autocast
@pytest.mark.parametrize("train_weight", [True, False])
def test_rms_norm_matches_plain_ops(dtype, out_dtype, train_weight, kernels):
    torch.manual_seed(0)
    x0 = (torch.randn(2, 77, 80) * 3).to(dtype)  # 154 rows: three blocks of the kernel's weight-gradient sum
    w0 = (1 + 0.1 * torch.randn(80)).to(dtype)
    outs = []
    for fn in (rms_norm, _ref_rms_norm):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_(train_weight)
        y = fn(x, w, 1e-6, out_dtype)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        grads = torch.autograd.grad(y, (x, w) if train_weight else (x,), g)
        outs.append((y, *grads))
    (y, *gs), (yr, *gsr) = outs
    if kernels and dtype == torch.float32:
        _close(y, yr, out_dtype or dtype)
    else:
        assert torch.equal(y, yr)  # the forward is the same ops in the same order
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(gs, gsr):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_plain_ops(dtype, kernels):
    torch.manual_seed(0)
    a0, b0 = (3 * torch.randn(30, 9, 333)).to(dtype), torch.randn(30, 9, 333).to(dtype)  # 16-wide tails
    g = torch.randn(30, 9, 333).to(dtype)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    y = swiglu(a, b)
    ga, gb = torch.autograd.grad(y, (a, b), g)
    ar, br = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    yr = F.silu(ar) * br
    gar, gbr = torch.autograd.grad(yr, (ar, br), g)
    if kernels:
        for a, b in ((y, yr), (ga, gar), (gb, gbr)):
            _close(a, b, dtype)
    else:  # autograd's own formulas, recomputing silu: bit-identical, bf16 included
        assert torch.equal(y, yr) and torch.equal(ga, gar) and torch.equal(gb, gbr)


def _saved_bytes(fn, *args) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def test_fewer_saved_tensors():
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.ones(256, requires_grad=True)
    act = 64 * 256 * 4
    # plain ops keep x and the normalised x; the Function keeps x (and a (64, 1) rstd)
    assert _saved_bytes(_ref_rms_norm, x, w, 1e-5) >= 2 * act
    assert _saved_bytes(rms_norm, x, w, 1e-5) < 1.1 * act
    a, b = torch.randn(64, 256, requires_grad=True), torch.randn(64, 256, requires_grad=True)
    assert _saved_bytes(lambda p, q: F.silu(p) * q, a, b) == 3 * act
    assert _saved_bytes(swiglu, a, b) == 2 * act


def test_no_graph_without_grad():
    x, w = torch.randn(4, 16), torch.ones(16)
    assert rms_norm(x, w, 1e-5).grad_fn is None
    with torch.no_grad():
        assert rms_norm(x.requires_grad_(), w, 1e-5).grad_fn is None


@pytest.mark.parametrize("recipe", [False, True])
def test_saved_as_recipe_frees_the_activation_and_rebuilds_views_of_it(recipe):
    torch.manual_seed(0)
    x, w = torch.randn(8, 4, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    h = x * 2
    alive = weakref.ref(h)
    with saved_as_recipe(h, lambda: x.detach() * 2) if recipe else contextlib.nullcontext():
        y = h.t() @ w  # mm saves a transposed view of h: rebuilt with its own strides
    del h
    gc.collect()
    assert (alive() is not None) is not recipe  # without the recipe the graph keeps h alive
    y.square().sum().backward()
    h = x.detach() * 2
    torch.testing.assert_close(w.grad, 2 * h @ (h.t() @ w.detach()), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, 2 * 2 * w.detach() @ (h.t() @ w.detach()).t(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["full", "lora", "lora-dropout"])
def test_layer_recipes_free_norm_outputs_and_swiglu_product_with_identical_grads(method, precision):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", num_hidden_layers=1))
    model.init_weights(torch.Generator().manual_seed(0))
    if method != "full":
        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1 if method == "lora-dropout" else 0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # B = 0 would zero every LoRA gradient but B's
    layer = model.model.layers[0].train()
    attn, mlp = layer.self_attn, layer.mlp
    T = 32
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T).expand(2, T), torch.float32)
    x0 = torch.randn(2, T, 128)
    results = []
    for recipes in (False, True):
        inputs = []
        hooks = [
            m.register_forward_pre_hook(lambda m, a: inputs.append(weakref.ref(a[0])))  # noqa: B023
            for m in (attn.q_proj, mlp.gate_proj, mlp.down_proj)
        ]
        x = x0.clone().requires_grad_()
        torch.manual_seed(1)  # the same LoRA dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = layer(x, cos, sin, None, None, recompute_cheap_activations=recipes)
        for h in hooks:
            h.remove()
        gc.collect()
        kept = [r() is not None for r in inputs]
        # The normed inputs and the SwiGLU product are kept as data, or as recipes. With LoRA dropout
        # nothing keeps them (frozen bases need no input for a weight gradient, LoRA saves the dropped-out copy).
        assert kept == [not recipes and method != "lora-dropout"] * 3
        y.float().square().sum().backward()
        results.append([x.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
        layer.zero_grad(set_to_none=True)
    assert len(results[0]) > 1
    for a, b in zip(*results):
        assert torch.equal(a, b)  # bit-identical: the recipes redo the forward's exact ops


@pytest.mark.parametrize("recipes", [False, True])
def test_params_recast_in_backward_keeps_weight_copies_as_casts_with_identical_grads(monkeypatch, recipes):
    """Under bf16 autocast every linear's bf16 weight copy is saved as its cast, also inside the
    layer's own recipe blocks (the innermost hooks are the only ones autograd calls)."""
    from yunque.ops import params_recast_in_backward, recompute

    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", num_hidden_layers=1))
    model.init_weights(torch.Generator().manual_seed(0))
    layer = model.model.layers[0].train()
    T = 32
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T).expand(2, T), torch.float32)
    x0 = torch.randn(2, T, 128)
    pack = recompute._pack_cast
    casts = []
    monkeypatch.setattr(recompute, "_pack_cast", lambda x: casts.append(pack(x)) or casts[-1])
    results, counts = [], []
    for recast in (False, True):
        casts.clear()
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), params_recast_in_backward(recast):
            y = layer(x, cos, sin, None, None, recompute_cheap_activations=recipes)
        y.float().square().sum().backward()  # after autocast: its cache of weight copies is gone
        counts.append(sum(isinstance(c, recompute._ParamCast) for c in casts))
        results.append([x.grad] + [p.grad for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    assert counts == [0, 7]  # q, k, v, o, gate, up, down
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_only_the_seam_imports_yunque_cpu():
    """yunque/cpu/ stays deletable: outside it, only yunque/ops/seam.py reaches in (and survives its absence)."""
    import re
    from pathlib import Path

    import yunque

    root = Path(yunque.__file__).parent
    reach = re.compile(r"^\s*(from yunque\.cpu\b|from yunque import cpu\b|import yunque\.cpu\b)", re.M)
    found = {
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.relative_to(root).parts[0] != "cpu" and reach.search(p.read_text(encoding="utf-8"))
    }
    assert found == {"ops/seam.py"}
