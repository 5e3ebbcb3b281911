"""The --dry-run memory estimate models what the training code allocates: its head term is loss.py's chunk."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from yunque.train.loss import _chunk_rows, linear_cross_entropy
from yunque.train.memory_estimate import head_chunk_bytes


class _PeakBuffers(TorchDispatchMode):
    """The peak bytes of live (rows, vocab) buffers made while active (a storage lives until its last view dies).

    Transposed views of a (vocab, dim) weight are not such buffers (stride 1 along the vocabulary only for rows)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.live, self.peak = vocab, {}, 0

    def _free(self, ptr: int) -> None:
        self.live.pop(ptr, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == self.vocab and t.stride(1) == 1:
                s = t.untyped_storage()  # one Python object per storage, finalised when the storage is freed
                if s.data_ptr() not in self.live:
                    self.live[s.data_ptr()] = s.nbytes()
                    weakref.finalize(s, self._free, s.data_ptr())
                    self.peak = max(self.peak, sum(self.live.values()))
        return out


def _allocated(vocab: int, dtype: torch.dtype, rows: int) -> int:
    torch.manual_seed(0)
    h = torch.randn(rows, 16, requires_grad=True)
    w = (torch.randn(vocab, 16) * 0.1).requires_grad_()
    y = torch.randint(0, vocab, (rows,))
    rec = _PeakBuffers(vocab)
    with rec, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        linear_cross_entropy(h, w, y).backward()
    return rec.peak


@pytest.mark.parametrize(
    "vocab, dtype", [(1000, torch.float32), (1000, torch.bfloat16), (40_000, torch.float32)]
)  # 40k fp32: past the 64 MiB cap, 256-row chunks
@pytest.mark.parametrize("chunks", [1, 1.5, 2.5])
def test_head_chunk_term_is_what_the_loss_allocates(monkeypatch, vocab, dtype, chunks):
    from yunque.ops import seam

    monkeypatch.setattr(seam, "kernels", None)  # the plain-PyTorch head (also where yunque/cpu/ is absent)
    rows = int(chunks * _chunk_rows(vocab, dtype.itemsize))
    got, est = _allocated(vocab, dtype, rows), head_chunk_bytes(vocab, rows, dtype)
    # An upper bound, and a tight one: in bf16 the estimate still counts a buffer that the
    # head no longer keeps across chunks, so it is up to 1/3 high there.
    assert got <= est <= 1.4 * got, (got, est)


def test_head_chunk_term_bounds_the_fused_kernel():
    from yunque.ops.seam import kernels

    probe = (torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.long), False)
    if kernels is None or kernels.xent_(*probe) is None:
        pytest.skip("yunque's CPU kernels do not run here")
    vocab, dtype = 1000, torch.bfloat16
    rows = _chunk_rows(vocab, dtype.itemsize) + 100
    got = _allocated(vocab, dtype, rows)
    assert 0 < got <= head_chunk_bytes(vocab, rows, dtype)


def test_estimate_memory_terms(tmp_path):
    from yunque.config import from_dict
    from yunque.model import Transformer
    from yunque.presets import get_preset
    from yunque.train.config import TrainConfig
    from yunque.train.memory_estimate import estimate_memory

    model = Transformer(get_preset("tiny", vocab_size=1000, tie_word_embeddings=False))
    cfg = from_dict(
        TrainConfig,
        {
            "method": "pretrain",
            "model": {"preset": "tiny"},
            "tokenizer": str(tmp_path),
            "data": {"train": [str(tmp_path / "x.txt")], "seq_len": 64},
            "micro_batch": 2,
        },
    )
    est = estimate_memory(model, cfg)
    n = sum(p.numel() for p in model.parameters())
    assert est["grads"] * (1 << 30) == 4 * n and est["optimizer"] * (1 << 30) == 8 * n
    assert est["head"] * (1 << 30) >= head_chunk_bytes(1000, 2 * 64, torch.float32)
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
