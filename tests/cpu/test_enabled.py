"""The one switch: with `yunque.cpu.enabled()` False (YUNQUE_CPU=0) nothing in yunque/cpu/ runs, and the
model, its training step and inference give what the kernels give, to their precision."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import yunque.cpu
from yunque import ops
from yunque.cpu import kernels as cpu_kernels
from yunque.model import ModelConfig, Transformer
from yunque.train.loss import CausalLMLoss
from yunque.train.step import DeviceBatch, make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[2]


def _in_a_process(env: dict) -> dict:
    code = textwrap.dedent("""
        import json, torch
        import yunque.cpu
        from yunque import ops
        from yunque.cpu import kernels
        from yunque.model import ModelConfig, Transformer
        ran = []

        def counted(real):
            def run(*a, **kw):
                y = real(*a, **kw)
                ran.append(y is not None)
                return y
            return run

        for name in ("attention", "rms_norm", "swiglu"):
            setattr(kernels, name, counted(getattr(kernels, name)))
        m = Transformer(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
        m(torch.randint(0, 64, (1, 8))).sum().backward()
        print(json.dumps({"enabled": yunque.cpu.enabled(), "kernels": any(ran), "tune": ops.tune_cpu_memory(),
                          "decode": ops.arrange_for_decode_(m.requires_grad_(False)),
                          "lanes": kernels._lib().yq_lanes() if any(ran) else 0}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "YUNQUE_CPU"} | env | {"PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_YUNQUE_CPU_0_turns_every_speed_up_off():
    off = _in_a_process({"YUNQUE_CPU": "0"})
    assert off == {"enabled": False, "kernels": False, "tune": False, "decode": 0, "lanes": 0}
    on = _in_a_process({})
    assert on["enabled"] and on["decode"] > 0
    if cpu_kernels._lib() is not None:
        assert on["kernels"]


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_kernels.cpu_flags(), reason="needs a CPU with AVX2 and FMA")
def test_YUNQUE_CPU_ISA_avx2_runs_the_avx2_build():
    """What an AVX2-only CPU runs, forced on any CPU that has AVX2: the 8-lane build, in the model."""
    got = _in_a_process({"YUNQUE_CPU_ISA": "avx2"})
    assert got["kernels"] and got["lanes"] == 8


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts, per kernel, the calls that ran it (returned a tensor rather than None)."""
    calls = {}

    def counted(name, real):
        def run(*a, **kw):
            y = real(*a, **kw)
            if y is not None:
                calls[name] = calls.get(name, 0) + 1
            return y

        return run

    for name in ("attention", "rms_norm", "swiglu", "xent_"):
        monkeypatch.setattr(cpu_kernels, name, counted(name, getattr(cpu_kernels, name)))
    return calls


def _model() -> Transformer:
    cfg = ModelConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )  # head dim 32: RoPE inside the kernel
    m = Transformer(cfg)
    m.init_weights(torch.Generator().manual_seed(0))
    return m


def _steps(precision: str, packed: bool) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Inference logits, then three training steps from the same weights and batch: (losses, the first
    step's gradients, logits)."""
    torch.manual_seed(0)
    model = _model()
    B, T = 2, 64
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model.eval()(ids).float()
    module = CausalLMLoss(model).train()
    opt = make_optimizer(module, 1e-3, 0.0, (0.9, 0.999), 1e-8)
    pos, mask = torch.arange(T).expand(B, T), None
    if packed:
        mask = ops.Segments.from_doc_ids(torch.tensor([[0] * 24 + [1] * 40, [0] * 64]))
        pos = torch.cat([torch.arange(24), torch.arange(40), torch.arange(64)]).view(B, T)
    targets = ids[:, 1:].reshape(-1)
    idx = torch.arange(B * T).view(B, T)[:, :-1].reshape(-1)
    batch = DeviceBatch(ids, pos, mask, idx, targets)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = None

    def keep_grads(*_):
        nonlocal grads
        if grads is None:
            grads = torch.cat([p.grad.flatten() for p in params])

    hook = opt.register_step_pre_hook(keep_grads)
    losses = [
        float(
            train_step(
                module,
                opt,
                [batch],
                len(targets),
                world=1,
                precision=precision,
                grad_clip=1.0,
                no_sync=lambda _: contextlib.nullcontext(),
                params=params,
            )[0]
        )
        for _ in range(3)
    ]
    hook.remove()
    return losses, grads, logits


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_and_forward_without_the_kernels_match_them(monkeypatch, kernel_calls, precision, packed):
    on = _steps(precision, packed)
    if cpu_kernels._lib() is not None:  # else both runs are PyTorch's, and must agree exactly
        assert set(kernel_calls) == {"attention", "rms_norm", "swiglu", "xent_"}
    kernel_calls.clear()
    monkeypatch.setattr(yunque.cpu, "enabled", lambda: False)
    off = _steps(precision, packed)
    assert kernel_calls == {}  # switched off, no kernel ran
    (losses, grads, logits), (losses_pt, grads_pt, logits_pt) = on, off
    tol = 1e-5 if precision == "fp32" else 2e-2
    for a, b in zip(losses, losses_pt):
        assert abs(a - b) <= tol * abs(b)
    assert losses[-1] < losses[0]
    assert F.cosine_similarity(grads, grads_pt, dim=0) > (1 - 1e-6 if precision == "fp32" else 0.999)
    if precision == "fp32":
        torch.testing.assert_close(logits, logits_pt, rtol=1e-4, atol=1e-5)
    else:
        assert F.cosine_similarity(logits.flatten(), logits_pt.flatten(), dim=0) > 0.999


def test_switched_off_memory_and_decode_layout_are_left_alone(monkeypatch):
    monkeypatch.setattr(yunque.cpu, "enabled", lambda: False)
    assert ops.tune_cpu_memory() is False
    model = _model().eval().requires_grad_(False)
    before = {name: type(m) for name, m in model.named_modules()}
    assert ops.arrange_for_decode_(model) == 0
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
