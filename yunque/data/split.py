"""Deterministic, leakage-free split assignment and train-only oversampling.

A record's split is a pure function of (seed, its content, its label when stratifying):
a keyed BLAKE2b hash mapped to [0, 1) and cut at the split ratios. Nothing depends on
the other records, so adding records never moves an existing one, and the same input and
config always give the same splits. Near-duplicate clusters go where their first member
(the cluster's representative) went; the pipeline passes the representative's key here.

Stratification (classification): the content hash is independent of the label, so every label
gets its split shares in expectation, and that is the default because it is the only rule under
which adding records anywhere never moves an existing one. For small labels the binomial noise is
large (a 10% label in a 200-record test split lands anywhere from 11 to 29 records), so
`stratify: true` offers exact shares instead: the k-th kept record of a label, in input order, goes
where the golden-ratio sequence frac(offset + k * 0.618...) falls, with a seeded per-label offset.
Every label then has its exact shares in every split (to within a record or two), and appending
records (new files, new lines at the end) still never moves an existing one; the price is that
records inserted before existing ones of the same label can shift those.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")


_GOLDEN = 0.6180339887498949


def _unit(data: bytes, seed: int) -> float:
    h = hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2**64


def split_of(key: bytes, seed: int, ratios: tuple[float, float, float]) -> int:
    """0 (train), 1 (val) or 2 (test) for a content key."""
    return _cut(_unit(key, seed), ratios)


class Stratifier:
    """Per-label golden-ratio sequence over the labels' records in input order (see module doc)."""

    def __init__(self, seed: int, ratios: tuple[float, float, float]):
        self.seed, self.ratios = seed, ratios
        self._next: dict[str, int] = {}

    def __call__(self, label: str) -> int:
        k = self._next.get(label, 0)
        self._next[label] = k + 1
        u = (_unit(b"label\x00" + label.encode("utf-8"), self.seed) + k * _GOLDEN) % 1.0
        return _cut(u, self.ratios)


def _cut(u: float, ratios: tuple[float, float, float]) -> int:
    total = sum(ratios)
    if u < ratios[0] / total:
        return 0
    return 1 if u < (ratios[0] + ratios[1]) / total else 2


def oversample_plan(counts: dict[str, int], target_ratio: float) -> dict[str, int]:
    """Extra copies per label so that every label reaches `target_ratio` x the largest label's count.

    Labels already at or above the target get nothing; copies are never removed or capped."""
    if not counts:
        return {}
    target = int(-(-target_ratio * max(counts.values()) // 1))  # ceil without float surprises at integers
    return {lab: target - c for lab, c in sorted(counts.items()) if 0 < c < target}


def copies_for(index_in_label: int, count: int, extra: int) -> int:
    """How many extra copies the `index_in_label`-th training record of a label gets: the extra
    copies spread as evenly as possible, earlier records taking the remainder."""
    return extra // count + (1 if index_in_label < extra % count else 0)
