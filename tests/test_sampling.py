"""The one sampler of `generate` and the serving engine (yunque.sampling)."""

from __future__ import annotations

import torch

from yunque.generate import Sampling, sample_next
from yunque.sampling import sample
from yunque.serve.engine import SeqParams, sample_rows


def test_generate_and_engine_draw_the_same_tokens():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p in ((0.0, 1.0), (0.8, 1.0), (1.2, 0.9), (0.5, 0.3)):
        s = Sampling(temperature=temperature, top_p=top_p)
        ours = sample_next(logits, None, s, torch.Generator().manual_seed(7))
        rows = [SeqParams(1, temperature, top_p)] * 5
        served = sample_rows(logits, rows, [None] * 5, torch.Generator().manual_seed(7))
        assert torch.equal(ours, served), (temperature, top_p)


def test_a_seeded_row_does_not_depend_on_its_batch():
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(1))
    temps, top_p = torch.tensor([0.0, 0.7, 1.0, 1.3]), torch.tensor([1.0, 0.9, 0.0, 0.5])
    gens = lambda: [None, torch.Generator().manual_seed(3), None, torch.Generator().manual_seed(4)]  # noqa: E731
    batch = sample(logits, temps, top_p, generator=torch.Generator().manual_seed(0), row_generators=gens())
    assert batch[0] == logits[0].argmax() and batch[2] == logits[2].argmax()  # greedy; top_p 0 keeps the top token
    for i in (1, 3):
        alone = sample(logits[i : i + 1], temps[i : i + 1], top_p[i : i + 1], row_generators=[gens()[i]])
        assert alone[0] == batch[i]
    other = sample(logits, temps, top_p, generator=torch.Generator().manual_seed(99), row_generators=gens())
    assert torch.equal(other[[1, 3]], batch[[1, 3]])  # the shared generator does not touch seeded rows


def test_top_k_then_top_p():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, top_k=3, generator=g).item() for _ in range(300)} == {0, 1, 2}
    # top-k 3 leaves 4/9, 3/9, 2/9: top_p 0.7 keeps the first two (4/9 < 0.7 <= 7/9)
    assert {sample(logits, 1.0, 0.7, top_k=3, generator=g).item() for _ in range(300)} == {0, 1}
