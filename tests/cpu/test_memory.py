"""The CPU tensor arena (yunque/cpu/memory.py): placement, reuse, overflow, fork, threads, numerics.

Installing it is one-way for a process, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from yunque.cpu import memory as cpu_arena

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(cpu_arena._lib() is None, reason="no g++ or not Linux: the arena is not built")
MiB = 1 << 20


def run(code: str, env: dict | None = None) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_best_fit_split_merge_and_overflow():
    out = run("""
        import json, torch
        from yunque.cpu import memory as cpu_arena
        assert cpu_arena.install(reserve=32 << 20)
        MiB = 1 << 20
        r = {}
        a, b, c, d = (torch.empty(n * MiB, dtype=torch.uint8) for n in (8, 4, 4, 4))
        lo = a.data_ptr()
        r["adjacent"] = [t.data_ptr() - lo for t in (b, c, d)]
        del a, c                                         # holes of 8 MiB (first) and 4 MiB
        e = torch.empty(3 * MiB, dtype=torch.uint8)      # best fit: the 4 MiB hole, its last MiB left free
        r["into_smallest_hole"] = e.data_ptr() - lo
        r["after_split"] = cpu_arena.stats()
        small = torch.empty(1000)                         # < 256 KiB: not the arena's
        r["small_outside"] = cpu_arena.stats()["live"] == r["after_split"]["live"]
        big = torch.arange(30 * MiB // 8, dtype=torch.int64)   # does not fit the 32 MiB range: c10's allocator
        r["overflow_ok"] = int(big[-1]) == 30 * MiB // 8 - 1
        r["overflows"] = cpu_arena.stats()["overflows"]
        del b, d, e, big
        r["all_free"] = cpu_arena.stats()
        f = torch.empty(20 * MiB, dtype=torch.uint8)      # the merged blocks serve one as large as all of them
        r["merged_reused"] = f.data_ptr() == lo
        del f
        r["released"] = cpu_arena.release_free()
        print(json.dumps(r))
    """)
    assert out["adjacent"] == [8 * MiB, 12 * MiB, 16 * MiB]
    assert out["into_smallest_hole"] == 12 * MiB
    s = out["after_split"]
    assert (s["used"], s["live"], s["free"]) == (20 * MiB, 11 * MiB, 9 * MiB)
    assert out["small_outside"]
    assert out["overflow_ok"] and out["overflows"] == 1
    assert out["all_free"]["live"] == 0 and out["all_free"]["free"] == out["all_free"]["used"] == 20 * MiB
    assert out["merged_reused"]
    assert out["released"] == 20 * MiB


def test_raw_allocations_fork_and_threads():
    """oneDNN's bf16 GEMMs take raw blocks (small ones from c10, large from the arena) and free
    them by the raw deleter; a fork()ed child and concurrent threads allocate safely."""
    out = run("""
        import json, os, threading, torch
        from yunque.cpu import memory as cpu_arena
        assert cpu_arena.install()
        r = {}
        x = torch.randn(1024, 768)
        w = torch.randn(768, 2048)
        ref = (x.bfloat16().double() @ w.bfloat16().double())
        for _ in range(3):
            y = (x.bfloat16() @ w.bfloat16()).double()
        r["bf16_mm_err"] = float(((y - ref).abs() / (ref.abs() + 1)).max())
        pid = os.fork()
        if pid == 0:  # only small ops: libgomp's thread pool does not survive fork(), arena or not
            t = torch.empty(4 << 20)
            t[-8:] = 1.0
            ok = float(t[-8:].sum()) == 8.0
            del t
            os._exit(0 if ok and cpu_arena.stats()["live"] > 0 else 1)
        r["child"] = os.waitpid(pid, 0)[1]
        errors = []
        r["live_before"] = cpu_arena.stats()["live"]
        def work(seed):
            g = torch.Generator().manual_seed(seed)
            for _ in range(50):
                a = torch.randn(300, 1000, generator=g)
                if not torch.equal(a.clone().mul_(2), a * 2):
                    errors.append(seed)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        r["thread_errors"] = len(errors)
        r["live_after"] = cpu_arena.stats()["live"]
        print(json.dumps(r))
    """)
    assert out["bf16_mm_err"] < 1e-2
    assert out["child"] == 0
    assert out["thread_errors"] == 0
    assert out["live_after"] == out["live_before"] > 0  # the threads' blocks all came back


def test_training_steps_are_bit_identical_with_and_without_the_arena():
    code = """
        import json, contextlib, torch
        from yunque.model import Transformer
        from yunque.presets import get_preset
        from yunque.cpu.memory import tune
        from yunque.train.loss import CausalLMLoss
        from yunque.train.step import DeviceBatch, make_optimizer, train_step
        arena = tune() if ARENA else False
        torch.manual_seed(0)
        m = Transformer(get_preset("tiny", vocab_size=512)); m.init_weights(torch.Generator().manual_seed(0))
        mod = CausalLMLoss(m).train()
        opt = make_optimizer(mod, 1e-3, 0.0, (0.9, 0.999), 1e-8)
        B, T = 4, 256
        ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))
        flat = ids[:, 1:].reshape(-1); idx = torch.arange(B * T).view(B, T)[:, :-1].reshape(-1)
        mb = DeviceBatch(ids, torch.arange(T).expand(B, T), None, idx, flat)
        params = [p for p in mod.parameters() if p.requires_grad]
        losses = [float(train_step(mod, opt, [mb], len(flat), world=1, precision="fp32", grad_clip=1.0,
                                   no_sync=lambda s: contextlib.nullcontext(), params=params)[0]) for _ in range(4)]
        print(json.dumps({"arena": arena, "live": __import__("yunque.cpu.memory").cpu.memory.stats()["live"], "losses": losses}))
    """  # noqa: E501
    on, off = run(code.replace("ARENA", "True")), run(code.replace("ARENA", "False"))  # the kernels run in both
    assert on["arena"] and on["live"] > 0 and not off["arena"]
    assert on["losses"] == off["losses"]
    assert on["losses"][-1] < on["losses"][0]
