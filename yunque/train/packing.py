"""Pack documents into fixed-length training rows, deterministically and resumably.

A source is any indexed collection of documents: token ids plus a per-token loss mask
(`mask[t]` True: token t is a target the model learns to predict). `ArraySource` holds
one flat token stream with document offsets, which is exactly what a token-shard reader
memory-maps, so shards plug in without copying.

A row is `seq_len` tokens that may hold several documents. Positions restart at 0 for
each document and `doc_ids` numbers the documents within the row, so attention stays
within each one (`ops.Segments`): packing then trains exactly like one document per row,
without the padding. Labels are the next token *within the same document*, or -100.

Two modes:
- split (pretraining): documents flow across rows; a piece cut at a row end continues at
  position 0 in the next row. No token is lost as a target, only the context before a cut.
- whole (fine-tuning): a document never straddles rows. Each row is filled first-fit from a
  window of the next 64 documents, so short examples fill the gaps long ones leave (rows
  come out >95% full on Alpaca-like lengths instead of ~70% for next-fit). Longer than
  `seq_len`: truncated.

The data position (epoch, cursor in the epoch's order, offset in the document, the window)
is the whole state: the epoch order is a pure function of (seed, epoch), so a resumed run
sees the same rows as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

IGNORE = -100


class TokenSource(Protocol):
    def __len__(self) -> int: ...
    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray | None]: ...  # (ids int, loss mask bool | None = all)
    def lengths(self) -> np.ndarray: ...


class ArraySource:
    """Documents as slices of one token array: doc i is tokens[offsets[i]:offsets[i+1]]."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, mask: np.ndarray | None = None):
        self.tokens, self.offsets, self.mask = tokens, np.asarray(offsets, dtype=np.int64), mask

    @classmethod
    def from_docs(cls, docs: Sequence[tuple[Sequence[int], Sequence[bool] | None]]) -> ArraySource:
        lens = [len(ids) for ids, _ in docs]
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        tokens = np.fromiter((t for ids, _ in docs for t in ids), dtype=np.int32, count=int(offsets[-1]))
        if all(m is None for _, m in docs):
            return cls(tokens, offsets)
        mask = (
            np.concatenate(
                [np.asarray(m, dtype=bool) if m is not None else np.ones(len(ids), dtype=bool) for ids, m in docs]
            )
            if docs
            else np.zeros(0, dtype=bool)
        )
        return cls(tokens, offsets, mask)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], None if self.mask is None else self.mask[a:b]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def num_targets(self) -> int:
        """Tokens that are trained on (the first token of a document is never a target)."""
        if self.mask is None:
            return int(np.maximum(self.lengths() - 1, 0).sum())
        starts = self.offsets[:-1][self.lengths() > 0]
        return int(self.mask.sum() - self.mask[starts].sum())


@dataclass
class PackState:
    epoch: int = 0
    cursor: int = 0  # index into the epoch's document order
    offset: int = 0  # tokens of the current document already packed (split mode)
    rows: int = 0  # rows produced so far
    truncated: int = 0  # whole mode: documents cut to seq_len
    window: list = field(default_factory=list)  # whole mode: documents drawn from the order, not yet packed


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T) int64
    labels: torch.Tensor  # (R, T) int64, IGNORE where not trained
    positions: torch.Tensor  # (R, T) int64, restarting per document
    doc_ids: torch.Tensor  # (R, T) int64
    single_doc: bool  # every row is one unpadded document: plain causal attention suffices

    def rows(self, start: int, stop: int) -> Batch:
        sl = slice(start, stop)
        d = self.doc_ids[sl]
        return Batch(self.input_ids[sl], self.labels[sl], self.positions[sl], d, bool((d == 0).all()))

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


class Packer:
    def __init__(
        self,
        source: TokenSource,
        seq_len: int,
        *,
        split_docs: bool,
        shuffle: bool,
        seed: int,
        pad_id: int = 0,
        one_pass: bool = False,
    ):
        if len(source) == 0:
            raise ValueError("cannot pack an empty source")
        self.source, self.T, self.split, self.shuffle, self.seed, self.pad_id = (
            source,
            seq_len,
            split_docs,
            shuffle,
            seed,
            pad_id,
        )
        self.one_pass = one_pass  # stop at the end of epoch 0: the rest is padding (validation)
        self.state = PackState()
        self._order_epoch, self._order = -1, np.arange(0)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = len(self.source)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = PackState(**{**d, "window": list(d.get("window", []))})

    def rows_per_epoch(self) -> int:
        """Rows one pass over the data fills (whole mode: as packed in epoch 0's order)."""
        if self.split:
            return max(1, -(-int(self.source.lengths().sum()) // self.T))
        p = Packer(self.source, self.T, split_docs=False, shuffle=self.shuffle, seed=self.seed, one_pass=True)
        rows = 0
        while p._plan():
            rows += 1
        return rows

    @property
    def done(self) -> bool:
        """One-pass packers: every document has been packed."""
        return self.one_pass and self.state.epoch > 0 and not self.state.window

    def _draw(self) -> int | None:
        """The next document of the order (advancing epochs), or None past the end of a one-pass epoch."""
        st = self.state
        if self.one_pass and st.epoch > 0:
            return None
        i = int(self.order(st.epoch)[st.cursor])
        st.cursor += 1
        if st.cursor >= len(self.source):
            st.epoch, st.cursor = st.epoch + 1, 0
        return i

    def _plan(self) -> list[tuple[int, int, int]]:
        """The next row as (document, start, length) pieces; advances the data position."""
        st, T = self.state, self.T
        pieces, fill = [], 0
        lens = self._lengths()
        if self.split:
            while fill < T:
                if st.offset == 0:
                    nxt = self._peek_split()
                    if nxt is None:
                        break
                i = st.window[0]
                L = int(lens[i])
                n = min(L - st.offset, T - fill)
                pieces.append((i, st.offset, n))
                fill += n
                if st.offset + n < L:
                    st.offset += n
                else:
                    st.window.pop(0)
                    st.offset = 0
            return pieces
        # Whole mode: first fit over a window of upcoming documents, so short ones fill the gaps that
        # long ones leave; documents keep their order within a few rows, and the window is state.
        while len(st.window) < self.WINDOW and (i := self._draw()) is not None:
            st.window.append(i)
        k = 0
        while k < len(st.window) and fill < T:
            i = st.window[k]
            n = min(int(lens[i]), T)
            if n <= T - fill:
                pieces.append((i, 0, n))
                st.truncated += int(lens[i]) > T
                fill += n
                st.window.pop(k)
                if (j := self._draw()) is not None:
                    st.window.append(j)
            else:
                k += 1
        return pieces

    WINDOW = 64

    def _lengths(self) -> np.ndarray:
        if not hasattr(self, "_lens"):
            self._lens = self.source.lengths()
        return self._lens

    def _peek_split(self) -> int | None:
        st = self.state
        if not st.window:
            i = self._draw()
            if i is None:
                return None
            st.window.append(i)
        return st.window[0]

    def _row(self, ids: np.ndarray, lab: np.ndarray, pos: np.ndarray, doc: np.ndarray) -> int:
        T, fill = self.T, 0
        pieces = self._plan()
        for d, (i, a, n) in enumerate(pieces):
            ids_d, mask_d = self.source.doc(i)
            ids[fill : fill + n] = ids_d[a : a + n]
            tgt = ids_d[a + 1 : a + n + 1].astype(
                np.int64
            )  # the next token within the document; shorter by one at its end
            k = len(tgt)
            lab[fill : fill + k] = tgt if mask_d is None else np.where(mask_d[a + 1 : a + 1 + k], tgt, IGNORE)
            pos[fill : fill + n] = np.arange(n)
            doc[fill : fill + n] = d
            fill += n
        if fill < T:
            doc[fill:] = len(pieces)  # padding is its own document: it attends only to itself and is never a target
            pos[fill:] = np.arange(T - fill)
        self.state.rows += 1
        return fill

    def next_batch(self, rows: int) -> Batch:
        T = self.T
        ids = np.full((rows, T), self.pad_id, dtype=np.int64)
        lab = np.full((rows, T), IGNORE, dtype=np.int64)
        pos = np.zeros((rows, T), dtype=np.int64)
        doc = np.zeros((rows, T), dtype=np.int64)
        self.last_filled = sum(self._row(ids[r], lab[r], pos[r], doc[r]) > 0 for r in range(rows))
        t = torch.from_numpy
        return Batch(t(ids), t(lab), t(pos), t(doc), bool((doc == 0).all()))


def fixed_batches(source: TokenSource, seq_len: int, rows: int, *, split_docs: bool, pad_id: int = 0) -> list[Batch]:
    """One ordered pass over `source` (validation): every document exactly once."""
    p = Packer(source, seq_len, split_docs=split_docs, shuffle=False, seed=0, pad_id=pad_id, one_pass=True)
    out = []
    while not p.done:
        out.append(p.next_batch(rows))
    out[-1] = out[-1].rows(0, p.last_filled)  # rows past the end are pure padding: drop them
    return [b for b in out if len(b.input_ids)]
