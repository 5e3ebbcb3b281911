"""Exact and near-duplicate detection.

Exact: a 128-bit BLAKE2b digest of a record's normalised content (`records.content_text`
after cleaning and scrubbing, so two tickets that differ only in a redacted e-mail address
are duplicates).

Near: MinHash signatures (datasketch) over word shingles, in a banded LSH index with
datasketch's band parameters (see `NearDupIndex`). CJK characters count as one word each, so Chinese and Japanese text gets
character shingles while space-separated languages get word shingles. The LSH index is
built at a lower threshold than the one asked for (`threshold - 0.2`) so that pairs at the
threshold are found with high probability (about 0.985 at J = 0.8 with 128 permutations,
where an index at 0.8 would find only half of them); every candidate is then confirmed
by the MinHash estimate of its Jaccard similarity against the real threshold.

Signatures are computed in worker processes (`MinHasher`), the index lives in the main
process (`NearDupIndex`), and signatures travel between them as raw uint32 bytes.
"""  # noqa: E501

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_SCHEME = "affine32"  # datasketch >= 2.0 permutation scheme; signatures are uint32


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

        try:
            self._proto = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME, hashfunc=int)
        except TypeError:  # datasketch < 2.0 has one (32-bit) scheme and no `scheme` argument
            self._proto = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
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


class NearDupIndex:
    """Banded LSH over MinHash signatures, with every candidate confirmed by its estimated Jaccard.

    The banding is datasketch's: `MinHashLSH(threshold, num_perm)` chooses the number of bands b
    and rows r (minimising the weighted false positive and false negative areas), and band i
    covers signature values [i*r, (i+1)*r) as in MinHashLSH. The index itself is a single dict
    from a 64-bit band key to the records in that bucket, instead of MinHashLSH's per-band
    storage: a fraction of its memory and time per record, and the dedup index is the one thing
    whose memory grows with the input (bench/NOTES.md). `tests/data/test_dedup_split.py` checks
    that both return the same candidates. Keys are dense ints in insertion order.
    """

    def __init__(self, num_perm: int, threshold: float, seed: int = 1):
        from datasketch import MinHashLSH

        self.num_perm = num_perm
        self.threshold = threshold
        self.lsh_threshold = max(0.1, threshold - 0.2)
        params = MinHashLSH(threshold=self.lsh_threshold, num_perm=num_perm)
        self.b, self.r = params.b, params.r
        rng = np.random.default_rng(0x5EED + seed)
        # Random odd 64-bit multipliers, one per (band, row): a band key is a wrapping dot product.
        self._mult = rng.integers(1, 2**63, size=(self.b, self.r), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._buckets: dict[int, int | list[int]] = {}
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)
        self.size = 0

    def bands(self, sig_bytes: bytes) -> list[int]:
        """The b bucket keys of a signature (band index mixed in, so bands never share buckets)."""
        sig = np.frombuffer(sig_bytes, dtype=np.uint32)[: self.b * self.r].reshape(self.b, self.r)
        with np.errstate(over="ignore"):
            keys = (sig.astype(np.uint64) * self._mult).sum(axis=1, dtype=np.uint64)
        return keys.tolist()

    def candidates(self, bands: list[int]) -> set[int]:
        out: set[int] = set()
        get = self._buckets.get
        for k in bands:
            v = get(k)
            if v is None:
                continue
            if isinstance(v, int):
                out.add(v)
            else:
                out.update(v)
        return out

    def matches(self, sig_bytes: bytes, bands: list[int] | None = None) -> list[tuple[int, float]]:
        """Indexed keys whose estimated Jaccard with the signature is >= threshold, best first."""
        cands = self.candidates(bands if bands is not None else self.bands(sig_bytes))
        if not cands:
            return []
        sig = np.frombuffer(sig_bytes, dtype=np.uint32)
        keys = np.fromiter(cands, dtype=np.int64, count=len(cands))
        sims = (self._sigs[keys] == sig).mean(axis=1)
        keep = sims >= self.threshold
        keys, sims = keys[keep], sims[keep]
        order = np.lexsort((keys, -sims))  # best first, ties by earliest key: deterministic
        return [(int(keys[i]), float(sims[i])) for i in order]

    def add(self, sig_bytes: bytes, bands: list[int] | None = None) -> int:
        if self.size == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        key = self.size
        self._sigs[key] = np.frombuffer(sig_bytes, dtype=np.uint32)
        buckets = self._buckets
        for k in bands if bands is not None else self.bands(sig_bytes):
            v = buckets.get(k)
            if v is None:
                buckets[k] = key
            elif isinstance(v, int):
                buckets[k] = [v, key]
            else:
                v.append(key)
        self.size += 1
        return key

    def signature(self, key: int) -> bytes:
        return self._sigs[key].tobytes()
