"""Decontaminate the EXAONE 3.5 way: drop a training document that shares a 50-character substring
(stride 1) of normalized text with a benchmark test item.

Texts are compared in the normalized form of `fingerprint.normalize` (NFC, casefold, no punctuation
or whitespace), so re-spaced, re-cased and re-punctuated copies match. Every window of every item is
hashed (64-bit rolling hash) into one sorted numpy array; a bitmap over the hashes' top bits screens a
document's windows before the binary search, and a hash hit is confirmed by comparing the strings,
so a collision never drops a document. Memory: ~12 bytes per distinct benchmark window plus a bitmap
of 4 bytes per window; the items' normalized texts are kept for the string comparison.
"""

from __future__ import annotations

import glob
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestration.data.config import BenchmarkConfig, DecontaminateConfig
from orchestration.data.fingerprint import joined_windows, normalize, window_owner
from hanyeong.errors import ConfigError


@dataclass
class Match:
    """Why a document was dropped: the benchmark, the item's index, the shared normalized window."""

    benchmark: str
    item: int
    window: str


@dataclass
class BenchmarkIndex:
    """Hashes of every normalized window of every benchmark item, and the items to confirm hits."""

    window: int
    names: list[str]
    item_texts: list[str] = field(default_factory=list)  # normalized, at least `window` long
    item_benchmark: list[int] = field(default_factory=list)
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # sorted
    owners: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # item of each hash
    bitmap: np.ndarray = field(default_factory=lambda: np.zeros(1, np.uint8))
    shift: int = 61
    short: dict[str, int] = field(default_factory=dict)  # whole short items -> benchmark
    stats: dict[str, dict] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return (
            self.hashes.nbytes
            + self.owners.nbytes
            + self.bitmap.nbytes
            + sum(map(len, self.item_texts)) * 4
        )


def benchmark_files(bench: BenchmarkConfig, root: str) -> list[Path]:
    """The files a benchmark names: paths or glob patterns under `root`; each must match something."""
    from tokenizer.corpus import expand_paths

    files: list[Path] = []
    for pattern in bench.files:
        full = str(Path(root) / pattern)
        found = sorted(glob.glob(full, recursive=True)) if glob.has_magic(pattern) else [full]
        if not found or not Path(found[0]).exists():
            raise ConfigError(
                f"decontaminate.benchmarks {bench.name!r}: {full}: no such file or folder"
            )
        files.extend(expand_paths(found))
    return files


def read_items(bench: BenchmarkConfig, root: str) -> tuple[list[str], list[str]]:
    """(item texts, file names) of a benchmark; a file without the fields is a ConfigError."""
    from tokenizer.corpus import TextFields, read_file

    fields = TextFields.parse(bench.fields)
    items, names = [], []
    for path in benchmark_files(bench, root):
        texts, report = read_file(path, fields)
        if not texts:
            raise ConfigError(
                f"decontaminate.benchmarks {bench.name!r}: {path}: {report.error or 'no text'}"
            )
        items.extend(texts)
        names.append(str(path))
    return items, names


def build_index(config: DecontaminateConfig) -> BenchmarkIndex:
    """Read every benchmark of the config and hash its items' windows."""
    W = config.window_chars
    index = BenchmarkIndex(window=W, names=[b.name for b in config.benchmarks])
    for b, bench in enumerate(config.benchmarks):
        items, files = read_items(bench, config.root)
        long_before, short_before = len(index.item_texts), len(index.short)
        for text in items:
            norm = normalize(text)
            if len(norm) >= W:
                index.item_texts.append(norm)
                index.item_benchmark.append(b)
            elif config.short_item_min_chars and len(norm) >= config.short_item_min_chars:
                index.short.setdefault(norm, b)
        index.stats[bench.name] = {
            "files": len(files),
            "items": len(items),
            "items_with_windows": len(index.item_texts) - long_before,
            "short_items_matched_whole": len(index.short) - short_before,
            "windows": sum(len(t) - W + 1 for t in index.item_texts[long_before:]),
        }
    _hash_items(index)
    return index


def _hash_items(index: BenchmarkIndex) -> None:
    W, texts = index.window, index.item_texts
    if not texts:
        return
    _, hashes, ends = joined_windows(texts, W)
    owner, inside = window_owner(np.arange(len(hashes)), ends, W)
    hashes, owner = hashes[inside], owner[inside].astype(np.int32)
    order = np.argsort(hashes, kind="stable")  # equal hashes stay in item (config) order
    hashes, owner = hashes[order], owner[order]
    first = np.ones(
        len(hashes), dtype=bool
    )  # one entry per (hash, item): a window repeated in an item once
    first[1:] = (hashes[1:] != hashes[:-1]) | (owner[1:] != owner[:-1])
    index.hashes, index.owners = hashes[first], owner[first]
    # A bitmap of ~32 bits per distinct hash: ~3% of a clean document's windows reach the search.
    bits = max(16, min(34, int(np.ceil(np.log2(len(index.hashes) * 32)))))
    index.shift = 64 - bits
    slots = index.hashes >> np.uint64(index.shift)
    index.bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
    np.bitwise_or.at(
        index.bitmap, slots >> np.uint64(3), np.left_shift(1, slots & np.uint64(7)).astype(np.uint8)
    )


class Decontaminator:
    """Checks batches of normalized documents against a `BenchmarkIndex`, counting what it removes."""

    def __init__(self, index: BenchmarkIndex):
        self.index = index
        self.removed: Counter[str] = Counter()
        self.checked = 0

    def check(self, normalized: list[str]) -> list[Match | None]:
        """For each normalized document, the first benchmark (config order) it shares a window with."""
        ix, W = self.index, self.index.window
        found: list[Match | None] = [None] * len(normalized)
        self.checked += len(normalized)
        if len(ix.hashes) and normalized:
            joined, hashes, ends = joined_windows(normalized, W)
            slots = hashes >> np.uint64(ix.shift)
            screened = np.flatnonzero(
                (ix.bitmap[slots >> np.uint64(3)] >> (slots & np.uint64(7)).astype(np.uint8)) & 1
            )
            lo = np.searchsorted(ix.hashes, hashes[screened], side="left")
            hi = np.searchsorted(ix.hashes, hashes[screened], side="right")
            hit = hi > lo
            starts, lo, hi = screened[hit], lo[hit], hi[hit]
            docs, inside = window_owner(starts, ends, W)
            starts, lo, hi, docs = starts[inside], lo[inside], hi[inside], docs[inside]
            for d, item, window in self._confirm(joined, starts, lo, hi, docs):
                found[d] = Match(ix.names[ix.item_benchmark[item]], item, window)
        if ix.short:
            for d, text in enumerate(normalized):
                if found[d] is None and len(text) < W and text in ix.short:
                    found[d] = Match(ix.names[ix.short[text]], -1, text)
        for match in found:
            if match is not None:
                self.removed[match.benchmark] += 1
        return found

    def _confirm(self, joined: str, starts, lo, hi, docs):
        """(document, item, window) for each document: the first item, in config order, that really
        contains one of its hash-hit windows (comparing strings rules out hash collisions)."""
        ix, W = self.index, self.index.window
        earliest = ix.owners[lo]  # equal hashes are sorted by item: the earliest item a hit may be
        best: dict[int, tuple[int, str]] = {}
        for k in np.lexsort((starts, earliest, docs)).tolist():
            d = int(docs[k])
            if d in best and best[d][0] <= earliest[k]:
                continue
            window = joined[starts[k] : starts[k] + W]
            for item in ix.owners[lo[k] : hi[k]].tolist():
                if d in best and item >= best[d][0]:
                    break
                if window in ix.item_texts[item]:
                    best[d] = (item, window)
                    break
        return [(d, item, window) for d, (item, window) in best.items()]
