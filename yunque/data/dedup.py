"""Exact and near-duplicate detection.

Exact: a 128-bit BLAKE2b digest of a record's normalised content (`records.content_text`
after cleaning and scrubbing, so two tickets that differ only in a redacted e-mail address
are duplicates).

Near: MinHash signatures (datasketch) over word shingles, indexed with datasketch's
`MinHashLSH`. CJK characters count as one word each, so Chinese and Japanese text gets
character shingles while space-separated languages get word shingles. The LSH index is
built at a lower threshold than the one asked for (`threshold - 0.2`) so that pairs at the
threshold are found with high probability (about 0.985 at J = 0.8 with 128 permutations,
where an index at 0.8 would find only half of them); every candidate is then confirmed
by the MinHash estimate of its Jaccard similarity against the real threshold.

Signatures are computed in worker processes (`MinHasher`), the index lives in the main
process (`NearDupIndex`), and signatures travel between them as raw uint32 bytes.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_SCHEME = "affine32"


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, k: int) -> set[bytes]:
    """Lower-cased word k-grams (CJK characters are words); a text shorter than k is one shingle."""
    toks = _TOKEN.findall(text.lower())
    if len(toks) <= k:
        return {" ".join(toks).encode("utf-8")}
    return {" ".join(toks[i : i + k]).encode("utf-8") for i in range(len(toks) - k + 1)}


class MinHasher:
    """Text -> MinHash signature bytes; builds its permutations once, not per text."""

    def __init__(self, num_perm: int, shingle_size: int, seed: int = 1):
        from datasketch import MinHash

        self._proto = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME)
        self.shingle_size = shingle_size

    def __call__(self, text: str) -> bytes:
        m = self._proto.copy()
        m.update_batch(list(shingles(text, self.shingle_size)))
        return m.hashvalues.astype(np.uint32).tobytes()


class NearDupIndex:
    """LSH index over signatures with confirmed matches. Keys are dense ints (insertion order)."""

    def __init__(self, num_perm: int, threshold: float, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self.num_perm = num_perm
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=max(0.1, threshold - 0.2), num_perm=num_perm, prepickle=False)
        self._perms = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
        self._MinHash = MinHash
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)
        self.size = 0

    def _minhash(self, sig: np.ndarray):
        return self._MinHash(hashvalues=sig, permutations=self._perms, scheme=_SCHEME)

    def matches(self, sig_bytes: bytes) -> list[tuple[int, float]]:
        """Indexed keys whose estimated Jaccard with `sig_bytes` is >= threshold, best first."""
        sig = np.frombuffer(sig_bytes, dtype=np.uint32)
        cands = self.lsh.query(self._minhash(sig))
        if not cands:
            return []
        keys = np.fromiter(cands, dtype=np.int64, count=len(cands))
        sims = (self._sigs[keys] == sig).mean(axis=1)
        keep = sims >= self.threshold
        order = np.lexsort((keys[keep], -sims[keep]))  # best first, ties by earliest key: deterministic
        return [(int(keys[keep][i]), float(sims[keep][i])) for i in order]

    def add(self, sig_bytes: bytes) -> int:
        sig = np.frombuffer(sig_bytes, dtype=np.uint32)
        if self.size == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        key = self.size
        self._sigs[key] = sig
        self.lsh.insert(key, self._minhash(sig), check_duplication=False)
        self.size += 1
        return key

    def signature(self, key: int) -> bytes:
        return self._sigs[key].tobytes()
