"""Deterministic, leakage-free split assignment and train-only oversampling.

A record's split is a pure function of (seed, its content, its label when stratifying):
a keyed BLAKE2b hash mapped to [0, 1) and cut at the split ratios. Nothing depends on
the other records, so adding records never moves an existing one, and the same input and
config always give the same splits. Near-duplicate clusters go where their first member
(the cluster's representative) went; the pipeline passes the representative's key here.

Stratification: with `stratify` the label is part of the hashed key, so each label is
split by its own independent stream of hashes; every label then lands 80/10/10 in
expectation with binomial noise (about +-1 point for 1,000 records of a label). Exact
per-label quotas would need global ranks, which would let new records move old ones;
the report shows the measured distribution per split and names labels missing from
validation or test.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")


def split_of(key: bytes, seed: int, ratios: tuple[float, float, float], label: str | None = None) -> int:
    """0 (train), 1 (val) or 2 (test) for a content key."""
    h = hashlib.blake2b(key if label is None else key + b"\x00" + label.encode("utf-8"),
                        digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    u = int.from_bytes(h.digest(), "little") / 2**64
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
