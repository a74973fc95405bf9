"""Deduplicate: exact (hash of the normalized text) and near (MinHash + LSH over character shingles).

The first document seen is kept. Near duplicates follow Broder's MinHash: a document's signature is,
for each of `num_perm` hash functions, the minimum over its shingles (windows of `shingle_chars`
normalized characters); signatures are cut into `bands` of `rows` (chosen for the threshold as
datasketch does), and documents sharing a band are candidates. A candidate is a duplicate only if
its estimated Jaccard similarity (the share of equal signature entries) reaches the threshold, so
LSH's false positives never drop a document. Memory: ~0.5 KB of signature plus one dict entry per
band (~0.1 KB each) per kept document.

`check` is `fingerprint` (per text, independent of every other text: `prepare` runs it in Ray
tasks, chunk by chunk) followed by `decide` (in document order, against what was kept before: the
driver runs it), so fingerprints computed anywhere give the decisions of one sequential pass.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import numpy as np

from orchestration.data.config import DedupConfig
from orchestration.data.fingerprint import joined_windows, text_hash

BUCKET_CAP = 16  # kept documents remembered per band hash; bounds the comparisons per query
ROWS_PER_PASS = 1 << 14  # shingles permuted at once: a (ROWS_PER_PASS, num_perm) uint32 temporary
_integrate = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz


@cache
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimizing the false positive + false negative probability at `threshold`.

    The integrals of datasketch's `_optimal_param`: P(candidate | s) = 1 - (1 - s^rows)^bands.
    """
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            below = np.linspace(0.0, threshold, 201)
            above = np.linspace(threshold, 1.0, 201)
            fp = _integrate(1 - (1 - below**rows) ** bands, below)
            fn = _integrate(1 - (1 - (1 - above**rows) ** bands), above)
            if fp + fn < best_error:
                best, best_error = (bands, rows), fp + fn
    return best


class MinHasher:
    """Signatures [D, num_perm] uint32 of texts' character shingles.

    A shingle is the top 32 bits of its window hash x; permutation i is a seeded murmur3-style mix,
    h_i(x) = fmix((x ^ b_i) · a_i) in uint32 arithmetic: two multiply-xorshift rounds keep the
    estimate nearly unbiased (a single linear a·x + b overestimates similarity by ~0.03) at a
    third of the cost of 64-bit multiply-shift."""

    def __init__(self, num_perm: int = 128, shingle_chars: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32) | np.uint32(
            1
        )  # odd: a bijection
        self.b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
        self.shingle_chars = shingle_chars

    def permute(self, x: np.ndarray) -> np.ndarray:
        """[n] uint32 shingles -> [n, num_perm] uint32 permuted values."""
        v = (x[:, None] ^ self.b[None, :]) * self.a[None, :]
        v ^= v >> np.uint32(16)
        v *= np.uint32(0x85EBCA6B)
        v ^= v >> np.uint32(13)
        return v

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures [D, num_perm] uint32, has_shingles [D] bool) of normalized texts."""
        D, P, k = len(texts), len(self.a), self.shingle_chars
        sig = np.full((D, P), np.iinfo(np.uint32).max, dtype=np.uint32)
        _, hashes, ends = joined_windows(texts, k)
        positions = np.arange(len(hashes))
        owner = np.searchsorted(ends, positions, side="right")
        keep = positions + k <= ends[np.minimum(owner, D - 1)] if D else positions < 0
        shingles, owner = (hashes[keep] >> np.uint64(32)).astype(np.uint32), owner[keep]
        for start in range(0, len(shingles), ROWS_PER_PASS):
            h, who = shingles[start : start + ROWS_PER_PASS], owner[start : start + ROWS_PER_PASS]
            values = self.permute(h)
            cuts = np.flatnonzero(np.diff(who)) + 1  # rows of one document are contiguous
            bounds = [0, *cuts.tolist(), len(who)]
            for a, b in itertools.pairwise(
                bounds
            ):  # (faster than np.minimum.reduceat along axis 0)
                np.minimum(sig[who[a]], values[a:b].min(axis=0), out=sig[who[a]])
        has = np.zeros(D, dtype=bool)
        has[np.unique(owner)] = True
        return sig, has


@dataclass
class Fingerprints:
    """Per text of a batch: exact key, MinHash signature, LSH band hashes (None: switched off)."""

    size: int
    exact: list[int] | None  # text_hash of the normalized text
    sig: np.ndarray | None  # [D, num_perm] uint32
    has: np.ndarray | None  # [D] bool: the text has at least one shingle
    keys: np.ndarray | None  # [D, bands] uint64


class Deduplicator:
    """Keeps the first of exact and near duplicates; `check` returns the reason a text is dropped."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self.exact_seen: set[int] = set()
        self.hasher = MinHasher(config.num_perm, config.shingle_chars, config.seed)
        self.bands, self.rows = lsh_bands(config.threshold, config.num_perm)
        # band hash -> kept document (an int), or several (a list) when different documents share it
        self.tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self.kept = np.empty(
            (1024, config.num_perm), dtype=np.uint32
        )  # signatures of kept documents
        self.n_kept = 0
        mix = np.random.default_rng(config.seed + 1).integers(
            0, 2**63, size=self.rows, dtype=np.uint64
        )
        self.band_mix = mix * np.uint64(2) + np.uint64(1)

    def check(self, normalized: list[str]) -> list[str | None]:
        """For each normalized text, in order: 'exact', 'near' or None (kept, and remembered)."""
        return self.decide(self.fingerprint(normalized))

    def fingerprint(self, normalized: list[str]) -> Fingerprints:
        """What `decide` compares, per text and independent of the others: a Ray task's part."""
        c = self.config
        exact = [text_hash(text) for text in normalized] if c.exact else None
        sig = has = keys = None
        if c.near and normalized:
            sig, has = self.hasher.signatures(normalized)
            usable = self.bands * self.rows
            keys = (
                sig[:, :usable].reshape(len(normalized), self.bands, self.rows).astype(np.uint64)
                * self.band_mix
            ).sum(axis=2)  # [D, bands] band hashes (modulo 2^64)
        return Fingerprints(len(normalized), exact, sig, has, keys)

    def decide(self, fp: Fingerprints) -> list[str | None]:
        """The reasons of `check` from fingerprints, in order: the part that must be sequential."""
        c = self.config
        reasons: list[str | None] = [None] * fp.size
        keys = fp.keys.tolist() if fp.keys is not None else None
        for i in range(fp.size):
            if c.exact:
                key = fp.exact[i]
                if key in self.exact_seen:
                    reasons[i] = "exact"
                    continue
            near = c.near and bool(fp.has[i])
            if near and self._near_duplicate(fp.sig[i], keys[i]):
                reasons[i] = "near"
                continue
            if c.exact:
                self.exact_seen.add(key)
            if near:
                self._remember(fp.sig[i], keys[i])
        return reasons

    def _near_duplicate(self, sig: np.ndarray, keys: list[int]) -> bool:
        for table, key in zip(self.tables, keys):
            others = table.get(key)
            for other in (
                others if isinstance(others, list) else () if others is None else (others,)
            ):
                if np.mean(self.kept[other] == sig) >= self.config.threshold:
                    return True
        return False

    def _remember(self, sig: np.ndarray, keys: list[int]) -> None:
        if self.n_kept == len(self.kept):
            self.kept = np.concatenate([self.kept, np.empty_like(self.kept)])
        self.kept[self.n_kept] = sig
        for table, key in zip(self.tables, keys):
            others = table.get(key)
            if others is None:
                table[key] = self.n_kept
            elif isinstance(others, list):
                if len(others) < BUCKET_CAP:
                    others.append(self.n_kept)
            else:
                table[key] = [others, self.n_kept]
        self.n_kept += 1
