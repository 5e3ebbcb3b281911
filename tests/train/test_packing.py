"""Packing: documents never see each other, labels stay inside a document, the position is resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_util import one_thread

from yunque.model import Transformer, document_mask
from yunque.presets import get_preset
from yunque.train.packing import IGNORE, ArraySource, Packer, fixed_batches

_one_thread = pytest.fixture(autouse=True)(one_thread)


def _docs(n=40, seed=0, lo=2, hi=30):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(lo, hi))
        ids = rng.integers(1, 100, size=L).tolist()
        mask = (rng.random(L) < 0.7).tolist()
        out.append((ids, mask))
    return out


@pytest.mark.parametrize("split", [True, False])
def test_rows_hold_whole_documents_with_next_token_labels(split):
    docs = _docs()
    src = ArraySource.from_docs(docs)
    p = Packer(src, 16, split_docs=split, shuffle=True, seed=3)
    seen_targets = 0
    for _ in range(30):
        b = p.next_batch(2)
        for r in range(2):
            ids, lab, pos, doc = (t[r].numpy() for t in (b.input_ids, b.labels, b.positions, b.doc_ids))
            for d in np.unique(doc):
                sel = np.nonzero(doc == d)[0]
                assert (np.diff(sel) == 1).all()  # a document is one contiguous run
                assert (pos[sel] == np.arange(len(sel))).all()  # positions restart per document
                # every label is the next input token of the same document (or a cut piece's true next token)
                inner = sel[:-1]
                ok = (lab[inner] == IGNORE) | (lab[inner] == ids[inner + 1])
                assert ok.all()
            seen_targets += int((lab != IGNORE).sum())
    assert seen_targets > 0
    if not split:  # whole mode: each row's documents are complete documents of the source
        b = Packer(src, 32, split_docs=False, shuffle=False, seed=0).next_batch(1)
        doc = b.doc_ids[0].numpy()
        first = b.input_ids[0].numpy()[doc == 0]
        assert first.tolist() == docs[0][0][:32]


def test_split_mode_trains_every_target_exactly_once_per_epoch():
    docs = _docs(25)
    src = ArraySource.from_docs(docs)
    batches = fixed_batches(src, 16, 3, split_docs=True)
    got = sum(int((b.labels != IGNORE).sum()) for b in batches)
    assert got == src.num_targets()


def test_whole_mode_val_covers_every_document_once():
    docs = _docs(25)
    src = ArraySource.from_docs(docs)
    batches = fixed_batches(src, 32, 2, split_docs=False)
    assert sum(int((b.labels != IGNORE).sum()) for b in batches) == src.num_targets()


@pytest.mark.parametrize("split", [True, False])
def test_state_resumes_the_same_rows_across_epochs(split):
    src = ArraySource.from_docs(_docs(12, hi=12))
    a = Packer(src, 16, split_docs=split, shuffle=True, seed=5)
    for _ in range(7):
        a.next_batch(3)
    state = a.state_dict()
    assert state["epoch"] >= 1  # crossed an epoch boundary: the order of epoch 1 differs from epoch 0
    ref = [a.next_batch(3) for _ in range(6)]
    b = Packer(src, 16, split_docs=split, shuffle=True, seed=5)
    b.load_state_dict(json.loads(json.dumps(state)))  # as it travels through a checkpoint's state.json
    for x, y in zip(ref, (b.next_batch(3) for _ in range(6))):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.positions, y.positions) and torch.equal(x.doc_ids, y.doc_ids)


def test_packed_rows_equal_separate_documents():
    """The logits of a packed row equal each document run on its own (no attention across documents)."""
    torch.manual_seed(0)
    cfg = get_preset(
        "tiny",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Transformer(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    docs = [([5, 6, 7, 8, 9], None), ([10, 11, 12], None), ([13, 14, 15, 16], None)]
    b = Packer(ArraySource.from_docs(docs), 12, split_docs=False, shuffle=False, seed=0).next_batch(1)
    with torch.no_grad():
        packed = model(b.input_ids, b.positions, document_mask(b.doc_ids))[0]
        start = 0
        for ids, _ in docs:
            alone = model(torch.tensor([ids]))[0]
            torch.testing.assert_close(packed[start : start + len(ids)], alone, atol=1e-5, rtol=1e-5)
            start += len(ids)


def test_uint16_shard_source_gives_ignore_labels_not_wrapped_ids():
    """Token shards are uint16 with a uint8 mask: -100 must not wrap to 65436."""
    docs = _docs(10)
    ref = ArraySource.from_docs(docs)
    src = ArraySource(ref.tokens.astype(np.uint16), ref.offsets, ref.mask.astype(np.uint8))
    a = Packer(ref, 16, split_docs=False, shuffle=False, seed=0).next_batch(4)
    b = Packer(src, 16, split_docs=False, shuffle=False, seed=0).next_batch(4)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.input_ids, b.input_ids)
    assert int(b.labels.max()) < 100 and (b.labels == IGNORE).any()


def test_whole_mode_first_fit_fills_rows():
    """Alpaca-like lengths (median ~100, long tail) fill 512-token rows almost completely."""
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(np.log(100), 0.7, size=600).astype(int), 8, 600)
    src = ArraySource.from_docs([(list(range(1, n + 1)), None) for n in lens])
    p = Packer(src, 512, split_docs=False, shuffle=True, seed=0)
    rows = p.rows_per_epoch()
    used = np.minimum(lens, 512).sum()
    assert used / (rows * 512) > 0.95
    batches = fixed_batches(src, 512, 4, split_docs=False)
    assert sum(len(b.input_ids) for b in batches) <= rows + 1
