"""The kernels against PyTorch (attention in fp32/fp64, cross-entropy), and their callers: every test runs
on both builds, AVX-512 and AVX2 (bf16 only on the first), each skipped on a CPU without its instructions."""

import pytest
import torch
import torch.nn.functional as F

import yunque.cpu
from yunque.cpu import kernels as cpu_kernels
from yunque.model import ModelConfig, Transformer, rope_cos_sin
from yunque.ops import Segments, apply_rope

pytestmark = pytest.mark.skipif(cpu_kernels._lib() is None, reason="needs an AVX2 or AVX512-BF16 CPU and g++")

LANES = {"avx512": 16, "avx2": 8}


def _reload():
    cpu_kernels.isa.cache_clear()
    cpu_kernels._lib.cache_clear()


@pytest.fixture(autouse=True, params=list(LANES))
def isa(request, monkeypatch):
    """The build under test, loaded: the AVX2 one forced as YUNQUE_CPU_ISA=avx2 forces it."""
    monkeypatch.setattr(yunque.cpu, "forced_isa", lambda: request.param if request.param == "avx2" else None)
    _reload()
    if not cpu_kernels._FLAGS[request.param][0] <= cpu_kernels.cpu_flags():
        pytest.skip(f"the CPU cannot run the {request.param} build")
    lib = cpu_kernels._lib()
    assert cpu_kernels.isa() == request.param
    assert lib is not None and lib.yq_lanes() == LANES[request.param]  # that build answers, no other
    yield request.param
    _reload()  # later tests load the default build again


def _needs_bf16(isa, dtype=torch.bfloat16):
    if isa == "avx2" and dtype == torch.bfloat16:
        pytest.skip("the AVX2 build has no bf16 kernels")


def _visible(B, T, seg, window):  # (B, T, T): key j visible to query i
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    lo = torch.zeros(B, T, dtype=torch.long) if seg is None else seg.long()
    if window:
        lo = torch.maximum(lo, torch.arange(T) - window + 1)
    return (j <= i)[None] & (j >= lo[:, :, None])


def _segments(B, T, g):
    seg = torch.zeros(B, T, dtype=torch.int32)
    for b in range(B):
        for cut in sorted(torch.randint(1, T, (4,), generator=g).tolist()):
            seg[b, cut:] = cut
    return seg


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CASES = [  # B, H, K, T, hd, segments, window
    (1, 1, 1, 64, 64, False, None),
    (2, 8, 8, 512, 64, False, None),
    (2, 6, 2, 200, 64, False, None),  # GQA, T not a multiple of the tile
    (2, 4, 2, 130, 128, False, None),
    (1, 2, 1, 77, 32, False, None),
    (2, 4, 4, 300, 64, True, None),  # packed documents
    (2, 4, 2, 300, 64, False, 50),  # sliding window
    (2, 4, 2, 300, 64, True, 40),
]


@pytest.mark.parametrize("B,H,K,T,hd,segments,window", CASES)
def test_matches_fp32_attention_as_closely_as_pytorchs_bf16_kernel(isa, B, H, K, T, hd, segments, window):
    """Output and q/k/v gradients against fp32 attention on the same bf16 inputs: no further from it
    than PyTorch's own bf16 attention with the same mask (both round probabilities to bf16)."""
    _needs_bf16(isa)
    g = torch.Generator().manual_seed(T + H)
    # (B, T, n, hd) storage seen as (B, n, T, hd): the layout the model passes.
    q = torch.randn(B, T, H, hd, generator=g).transpose(1, 2).bfloat16().requires_grad_()
    k, v = (torch.randn(B, T, K, hd, generator=g).transpose(1, 2).bfloat16().requires_grad_() for _ in range(2))
    seg = _segments(B, T, g) if segments else None
    go = torch.randn(B, T, H, hd, generator=g)
    mask = _visible(B, T, seg, window)[:, None]  # (B, 1, T, T)

    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask, enable_gqa=H != K).transpose(1, 2)
    ref.backward(go)

    got = cpu_kernels.attention(q, k, v, seg_start=seg, window=window)
    assert got.shape == (B, T, H, hd) and got.dtype == torch.bfloat16
    got.float().backward(go)
    ours = [_rel(got, ref)] + [_rel(t.grad, r.grad) for t, r in zip((q, k, v), ref_in)]

    for t in (q, k, v):
        t.grad = None
    pt = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != K).transpose(1, 2)
    pt.float().backward(go)
    theirs = [_rel(pt, ref)] + [_rel(t.grad, r.grad) for t, r in zip((q, k, v), ref_in)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert a < 1.2 * b + 1e-4 and a < 1e-2, f"{name}: {a:.2e} against PyTorch's {b:.2e}"


@pytest.mark.parametrize("B,H,K,T,hd,segments,window", CASES)
def test_fp32_kernel_matches_fp64_attention_as_closely_as_pytorchs(B, H, K, T, hd, segments, window):
    """The fp32 kernel (no rounding of probabilities) against fp64 attention: output and gradients
    within a small factor of PyTorch's fp32 attention's own error, and at fp32 precision."""
    g = torch.Generator().manual_seed(T + H)
    q = torch.randn(B, T, H, hd, generator=g).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, T, K, hd, generator=g).transpose(1, 2).requires_grad_() for _ in range(2))
    seg = _segments(B, T, g) if segments else None
    go = torch.randn(B, T, H, hd, generator=g)
    mask = _visible(B, T, seg, window)[:, None]

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask, enable_gqa=H != K).transpose(1, 2)
    ref.backward(go.double())

    got = cpu_kernels.attention(q, k, v, seg_start=seg, window=window)
    assert got.shape == (B, T, H, hd) and got.dtype == torch.float32
    got.backward(go)
    ours = [_rel(got, ref)] + [_rel(t.grad, r.grad) for t, r in zip((q, k, v), ref_in)]
    for t in (q, k, v):
        t.grad = None
    pt = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != K).transpose(1, 2)
    pt.backward(go)
    theirs = [_rel(pt, ref)] + [_rel(t.grad, r.grad) for t, r in zip((q, k, v), ref_in)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert a < 3 * b + 1e-7 and a < 2e-6, f"{name}: {a:.2e} against PyTorch's {b:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_results_do_not_depend_on_the_thread_count(isa, dtype):
    """Work is split by (batch, head, query tile) and every sum has a fixed order: bit-identical
    outputs and gradients with 1 or 2 threads (exact resume relies on it)."""
    _needs_bf16(isa, dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 200, 64, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 200, 64, generator=g).to(dtype).requires_grad_() for _ in range(2))
    go = torch.randn(2, 200, 4, 64, generator=g).to(dtype)
    threads, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for t in (q, k, v):
                t.grad = None
            out = cpu_kernels.attention(q, k, v)
            out.backward(go)
            runs.append([out.detach(), q.grad, k.grad, v.grad])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_inside_the_kernel_matches_rope_before_it(isa, dtype):
    """q and k rotated by the kernel: the same forward bits as RoPE's ops then the kernel; the gradients
    taken back through the rotation in fp32 and rounded once (autograd rounds twice in bf16)."""
    _needs_bf16(isa, dtype)
    g = torch.Generator().manual_seed(0)
    B, H, K, T, hd = 2, 4, 2, 150, 64
    q0 = torch.randn(B, T, H, hd, generator=g).to(dtype).transpose(1, 2)
    k0, v0 = (torch.randn(B, T, K, hd, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    pos = torch.stack([torch.arange(T), torch.cat([torch.arange(60), torch.arange(90)])])  # packed row: restarts
    cos, sin = rope_cos_sin(1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)), pos, torch.float32)
    go = torch.randn(B, T, H, hd, generator=g).to(dtype)
    runs = []
    for fused in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        if fused:
            y = cpu_kernels.attention(q, k, v, rope=(cos[:, 0], sin[:, 0]))
            assert y is not None
        else:
            y = cpu_kernels.attention(apply_rope(q, cos, sin).to(dtype), apply_rope(k, cos, sin).to(dtype), v)
        y.backward(go)
        runs.append((y.detach(), q.grad, k.grad, v.grad))
    (y, dq, dk, dv), (yr, dqr, dkr, dvr) = runs
    assert torch.equal(y, yr) and torch.equal(dv, dvr)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(dq, dqr) < tol and _rel(dk, dkr) < tol


def _tiny(hd=16):
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=64 // hd,
        num_key_value_heads=32 // hd,
    )
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.train()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("hd", [16, 32])  # 32: RoPE inside the kernel
def test_training_step_with_the_kernel_matches_pytorchs_attention(isa, monkeypatch, packed, bf16, hd):
    """Under bf16 autocast, and in fp32, the model routes attention through the kernel (checked), and
    its loss and gradients match the same step on PyTorch's attention to that precision."""
    _needs_bf16(isa, torch.bfloat16 if bf16 else torch.float32)
    m = _tiny(hd)
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    mask, pos = None, None
    if packed:
        mask = Segments.from_doc_ids(torch.tensor([[0] * 20 + [1] * 28, [0] * 48]))
        pos = torch.cat([torch.arange(20), torch.arange(28), torch.arange(48)]).view(2, 48)
    calls = []
    real = cpu_kernels.attention

    def counted(*a, **kw):
        y = real(*a, **kw)
        if y is not None:
            calls.append(kw.get("rope") is not None)
        return y

    monkeypatch.setattr(cpu_kernels, "attention", counted)

    def step():
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m(ids, pos, mask).float().logsumexp(-1).mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])

    loss, grads = step()
    assert calls == [hd == 32] * 2  # one per layer, with cos and sin when the head dim allows
    monkeypatch.setattr(cpu_kernels, "attention", lambda *a, **kw: None)  # declines: PyTorch's attention
    loss_pt, grads_pt = step()
    assert len(calls) == 2
    if bf16:
        assert abs(loss - loss_pt) < 1e-2 * abs(loss_pt)
        assert F.cosine_similarity(grads, grads_pt, dim=0) > 0.999
    else:
        assert abs(loss - loss_pt) < 1e-6 * abs(loss_pt)
        torch.testing.assert_close(grads, grads_pt, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,V", [(5, 1000), (37, 1003), (64, 32000)])  # vocab tails that are not 16-wide
def test_xent_is_log_softmax_cross_entropy_and_its_gradient(isa, N, V, dtype):
    _needs_bf16(isa, dtype)
    g = torch.Generator().manual_seed(V)
    x = (3 * torch.randn(N, V, generator=g)).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    want = F.cross_entropy(x.float(), y, reduction="none")
    want_grad = torch.softmax(x.float(), -1) - F.one_hot(y, V)
    grad = x.clone()
    got = cpu_kernels.xent_(grad, y, grad=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    # One rounding of the fp32 gradient to bf16 (at most 2^-8 relative away); in fp32 a few ulps of exp.
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-5
    assert ((grad.float() - want_grad).abs() <= want_grad.abs() * tol + 1e-30 + (dtype == torch.float32) * 1e-9).all()
    same = x.clone()
    torch.testing.assert_close(cpu_kernels.xent_(same, y, grad=False), want, rtol=1e-6, atol=1e-5)
    assert torch.equal(same, x)  # without grad the logits are left alone


@pytest.mark.parametrize("bf16", [True, False])
def test_head_loss_and_gradients_match_the_unfused_path(isa, monkeypatch, bf16):
    from yunque.train.loss import linear_cross_entropy

    _needs_bf16(isa, torch.bfloat16 if bf16 else torch.float32)

    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 64, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(1000, 64, generator=g)).requires_grad_()
    y = torch.randint(0, 1000, (300,), generator=g)
    calls = []
    real = cpu_kernels.xent_

    def counted(*a, **kw):  # the calls the kernel took
        out = real(*a, **kw)
        if out is not None:
            calls.append(1)
        return out

    monkeypatch.setattr(cpu_kernels, "xent_", counted)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(yunque.cpu, "enabled", lambda: fused)  # noqa: B023
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = linear_cross_entropy(h, w, y)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    assert calls  # the fused run used the kernel
    (loss, gh, gw), (loss_pt, gh_pt, gw_pt) = results
    torch.testing.assert_close(loss, loss_pt, rtol=1e-6, atol=0)
    # The bf16 gradients of the logits may differ by one rounding (exp's last bits): far below bf16 noise.
    tol = 1e-3 if bf16 else 1e-6
    assert _rel(gh, gh_pt) < tol and _rel(gw, gw_pt) < tol


@pytest.fixture
def fresh_build(isa, monkeypatch, tmp_path):
    monkeypatch.setenv("YUNQUE_CACHE", str(tmp_path))
    cpu_kernels._lib.cache_clear()
    yield tmp_path


def test_builds_into_the_cache_once(isa, fresh_build):
    assert cpu_kernels._lib() is not None
    built = list((fresh_build / "kernels").glob(f"{cpu_kernels._FLAGS[isa][2]}-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    cpu_kernels._lib.cache_clear()
    assert cpu_kernels._lib() is not None and built[0].stat().st_mtime_ns == mtime


def _declined(q):
    """Whether every kernel declines inputs it takes when it runs (each returns None)."""
    x, w = torch.randn(4, 32), torch.ones(32)
    return (
        cpu_kernels.attention(q, q, q) is None
        and cpu_kernels.rms_norm(x, w, 1e-6) is None
        and cpu_kernels.swiglu(x, x) is None
        and cpu_kernels.xent_(x.clone(), torch.zeros(4, dtype=torch.long), False) is None
    )


def test_falls_back_when_switched_off_or_the_build_fails(fresh_build, monkeypatch):
    q = torch.zeros(1, 1, 4, 32)
    assert not _declined(q)
    with monkeypatch.context() as m:
        m.setattr(yunque.cpu, "enabled", lambda: False)
        assert _declined(q)
    assert not _declined(q)
    cpu_kernels._lib.cache_clear()
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.warns(UserWarning, match="CPU kernels unavailable"):
        assert cpu_kernels._lib() is None
    assert _declined(q)


def test_declines_what_it_has_no_kernel_for():
    q = torch.zeros(1, 2, 4, 32)
    assert cpu_kernels.attention(q.double(), q.double(), q.double()) is None  # fp64
    assert cpu_kernels.attention(q[..., :24], q[..., :24], q[..., :24]) is None  # head dim not a multiple of 16
    cos = torch.ones(1, 4, 16)  # head dim 16: RoPE cannot be fused, attention can
    assert cpu_kernels.attention(q[..., :16], q[..., :16], q[..., :16], rope=(cos, cos)) is None
    assert cpu_kernels.attention(q[..., :16], q[..., :16], q[..., :16]) is not None
    x = torch.randn(3, 8)
    assert cpu_kernels.rms_norm(x.bfloat16(), torch.ones(8), 1e-6) is None  # bf16 rows
    assert cpu_kernels.rms_norm(x, torch.ones(8), 1e-6, torch.float16) is None
    assert cpu_kernels.swiglu(x, x.bfloat16()) is None and cpu_kernels.swiglu(x, x[:2]) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_elementwise_kernels_do_not_depend_on_the_thread_count(isa, dtype):
    """RMSNorm's weight gradient sums fixed 64-row blocks in order; the rest is elementwise."""
    _needs_bf16(isa, dtype)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 80, generator=g), 1 + 0.1 * torch.randn(80, generator=g)
    gate, up, go = (torch.randn(300, 333, generator=g).to(dtype) for _ in range(3))
    x, w, gate, up = (t.requires_grad_() for t in (x, w, gate, up))
    threads, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = cpu_kernels.rms_norm(x, w, 1e-6, dtype)
            s = cpu_kernels.swiglu(gate, up)
            runs.append([y, *torch.autograd.grad(y, (x, w), y.detach()), s, *torch.autograd.grad(s, (gate, up), go)])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _rel_all(got, want):
    return max(_rel(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_pytorchs_ops(isa, dtype):
    """Output and both gradients against F.silu(gate) * up and autograd, over a size that is not vector-wide."""
    _needs_bf16(isa, dtype)
    g = torch.Generator().manual_seed(0)
    gate, up, go = ((3 * torch.randn(37, 333, generator=g)).to(dtype) for _ in range(3))
    runs = []
    for fn in (cpu_kernels.swiglu, lambda a, b: F.silu(a) * b):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        y = fn(a, b)
        runs.append((y, *torch.autograd.grad(y, (a, b), go)))
    assert _rel_all(*runs) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_pytorchs_ops(isa, out_dtype):
    """fp32 rows (D not vector-wide, rows over three weight-gradient blocks) against HF's formula and autograd."""
    _needs_bf16(isa, out_dtype)
    g = torch.Generator().manual_seed(0)
    x0, w0 = 3 * torch.randn(154, 83, generator=g), 1 + 0.1 * torch.randn(83, generator=g)
    go = torch.randn(154, 83, generator=g).to(out_dtype)

    def ref(x, w, eps, out_dtype):
        return (w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))).to(out_dtype)

    runs = []
    for fn in (cpu_kernels.rms_norm, ref):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w, 1e-6, out_dtype)
        assert y.dtype == out_dtype
        runs.append((y, *torch.autograd.grad(y, (x, w), go)))
    assert _rel_all(*runs) < (1e-6 if out_dtype == torch.float32 else 1e-2)


def test_bf16_runs_on_the_avx512_build_only(isa):
    """The AVX2 build has fp32 kernels only: in bf16 every entry point declines, and PyTorch's ops run."""
    x = torch.randn(4, 32).bfloat16()
    got = [
        cpu_kernels.swiglu(x, x),
        cpu_kernels.rms_norm(x.float(), torch.ones(32), 1e-6, torch.bfloat16),
        cpu_kernels.xent_(x.clone(), torch.zeros(4, dtype=torch.long), False),
    ]
    if "amx_bf16" not in cpu_kernels.cpu_flags():  # with AMX, bf16 attention is PyTorch's on either build
        got.append(cpu_kernels.attention(x.view(1, 1, 4, 32), x.view(1, 1, 4, 32), x.view(1, 1, 4, 32)))
    assert all((y is None) == (isa == "avx2") for y in got)
