"""The memory-lean RMSNorm and SwiGLU: same outputs and gradients as the plain ops, fewer saved tensors."""

import pytest
import torch
import torch.nn.functional as F

from yunque.ops import rms_norm, swiglu


def _ref_rms_norm(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_swiglu_gradcheck_float64():
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [True, False])
def test_rms_norm_matches_plain_ops(dtype, train_weight):
    torch.manual_seed(0)
    x0 = (torch.randn(2, 7, 64) * 3).to(dtype)
    w0 = (1 + 0.1 * torch.randn(64)).to(dtype)
    outs = []
    for fn in (rms_norm, _ref_rms_norm):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_(train_weight)
        y = fn(x, w, 1e-6)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        grads = torch.autograd.grad(y, (x, w) if train_weight else (x,), g)
        outs.append((y, *grads))
    (y, *gs), (yr, *gsr) = outs
    assert torch.equal(y, yr)  # the forward is the same ops in the same order
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(gs, gsr):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_plain_ops_exactly(dtype):
    torch.manual_seed(0)
    a0, b0 = torch.randn(3, 9, 32).to(dtype), torch.randn(3, 9, 32).to(dtype)
    g = torch.randn(3, 9, 32).to(dtype)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    y = swiglu(a, b)
    ga, gb = torch.autograd.grad(y, (a, b), g)
    ar, br = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    yr = F.silu(ar) * br
    gar, gbr = torch.autograd.grad(yr, (ar, br), g)
    # autograd's own formulas, recomputing silu: bit-identical, bf16 included
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
