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
import zlib

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_SCHEME = "affine32"


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, k: int) -> set[bytes]:
    """Lower-cased word k-grams (CJK characters are words); a text shorter than k is one shingle.
    The readable definition; `MinHasher` computes the same sets as 32-bit hashes, vectorised."""
    toks = _TOKEN.findall(text.lower())
    if len(toks) <= k:
        return {" ".join(toks).encode("utf-8")}
    return {" ".join(toks[i : i + k]).encode("utf-8") for i in range(len(toks) - k + 1)}


class MinHasher:
    """Text -> MinHash signature bytes (datasketch MinHash, permutations built once).

    Hashing every shingle string with SHA-1 (datasketch's default) costs more than the rest of the
    pipeline together, so each distinct word is hashed once (CRC-32, cached) and a shingle's
    hash is a polynomial over its words' hashes, computed for all shingles at once in numpy.
    """

    _MASK = np.uint64(0xFFFFFFFFFFFFFFFF)

    def __init__(self, num_perm: int, shingle_size: int, seed: int = 1):
        from datasketch import MinHash

        self._proto = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME, hashfunc=int)
        self.shingle_size = shingle_size
        self._cache: dict[str, int] = {}

    def _word_hashes(self, text: str) -> np.ndarray:
        cache = self._cache
        if len(cache) > 1_000_000:  # unbounded vocabularies (IDs, hashes) must not grow memory
            cache.clear()
        toks = _TOKEN.findall(text.lower())
        out = list(map(cache.get, toks))  # C-speed lookups; misses filled below
        if None in out:
            for i, h in enumerate(out):
                if h is None:
                    tok = toks[i]
                    out[i] = cache[tok] = zlib.crc32(tok.encode("utf-8")) | (len(tok) << 32)
        return np.asarray(out, dtype=np.uint64)

    def shingle_hashes(self, text: str) -> np.ndarray:
        w = self._word_hashes(text)
        k = min(self.shingle_size, max(1, len(w)))
        n = len(w) - k + 1
        if n <= 0:
            return np.zeros(1, dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrap-around multiplication is the point
            h = np.zeros(n, dtype=np.uint64)
            for j in range(k):
                h = h * np.uint64(0x100000001B3) + w[j : j + n] + np.uint64(j + 1)
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
        return np.unique(h & np.uint64(0xFFFFFFFF))

    def __call__(self, text: str) -> bytes:
        m = self._proto.copy()
        m.update_batch(self.shingle_hashes(text).tolist())
        return m.hashvalues.astype(np.uint32).tobytes()


class _Sig:
    """What MinHashLSH reads of a MinHash (its values, length, scheme) without building one:
    constructing a full MinHash per record in the main process cost more than the index itself."""

    __slots__ = ("hashvalues",)
    scheme = _SCHEME

    def __init__(self, hashvalues: np.ndarray):
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


class NearDupIndex:
    """LSH index over signatures with confirmed matches. Keys are dense ints (insertion order)."""

    def __init__(self, num_perm: int, threshold: float, seed: int = 1):
        from datasketch import MinHashLSH

        self.num_perm = num_perm
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=max(0.1, threshold - 0.2), num_perm=num_perm, prepickle=False)
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)
        self.size = 0

    def _minhash(self, sig: np.ndarray) -> _Sig:
        return _Sig(sig)

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
