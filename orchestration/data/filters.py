"""Filter: rule-based quality heuristics that hold for Korean as for English.

Length, mean word length, symbol and digit ratios and script ratio come from one numpy pass over a
batch's code points (a class per code point, counted per document); Gopher's repeated-line and
repeated-n-gram rules (Rae et al. 2021) run per document on whitespace-separated words, which are
eojeol in Korean. A document is dropped by the first rule it fails, in `FilterConfig` order.
"""

from __future__ import annotations

import unicodedata

import numpy as np

from orchestration.data.config import SCRIPTS, FilterConfig, RepeatedLinesRule, RepeatedNgramsRule
from orchestration.data.fingerprint import codepoints, window_hashes

# Code point classes: space, digit, prose punctuation, other punctuation or symbol, then one class per
# script of letters, then everything else (marks, controls, unassigned).
SPACE, DIGIT, PROSE, SYMBOL = 0, 1, 2, 3
LETTER = {name: 4 + i for i, name in enumerate(SCRIPTS)}
OTHER = 4 + len(SCRIPTS)
# Punctuation ordinary sentences use (Korean online text adds ~): not counted as symbols, so dialogue
# ("Who?" said Huck.) and trailing ellipses (재밌었던 기억...) are not junk.
PROSE_PUNCTUATION = ".,!?'\"():;-~…‘’“”·、。「」『』《》〈〉–—"
N_CLASSES = OTHER + 1
_SCRIPT_RANGES = {
    "hangul": [
        (0x1100, 0x11FF),
        (0x3130, 0x318F),
        (0xA960, 0xA97F),
        (0xAC00, 0xD7FF),
        (0xFFA0, 0xFFDC),
    ],
    "latin": [
        (0x41, 0x5A),
        (0x61, 0x7A),
        (0xAA, 0xAA),
        (0xBA, 0xBA),
        (0xC0, 0x24F),
        (0x250, 0x2AF),
        (0x1D00, 0x1DBF),
        (0x1E00, 0x1EFF),
        (0x2C60, 0x2C7F),
        (0xA720, 0xA7FF),
        (0xAB30, 0xAB6F),
        (0xFF21, 0xFF3A),
        (0xFF41, 0xFF5A),
    ],
    "han": [
        (0x2E80, 0x2FDF),
        (0x3005, 0x3007),
        (0x3400, 0x4DBF),
        (0x4E00, 0x9FFF),
        (0xF900, 0xFAFF),
        (0x20000, 0x323AF),
    ],
    "kana": [(0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9D)],
    "cyrillic": [(0x400, 0x52F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)],
    "greek": [(0x370, 0x3FF), (0x1F00, 0x1FFF)],
    "arabic": [(0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)],
}
_LAST_ASSIGNED = 0x323AF  # beyond the last CJK extension: unassigned, private use, tags -> OTHER
_TABLE: np.ndarray | None = None


def class_table() -> np.ndarray:
    """uint8 class of every code point [0x110000], built once (~0.2 s)."""
    global _TABLE
    if _TABLE is None:
        table = np.full(0x110000, OTHER, dtype=np.uint8)
        script = np.full(0x110000, LETTER["other"], dtype=np.uint8)
        for name, ranges in _SCRIPT_RANGES.items():
            for lo, hi in ranges:
                script[lo : hi + 1] = LETTER[name]
        for c in range(_LAST_ASSIGNED + 1):
            ch = chr(c)
            cat = unicodedata.category(ch)
            if ch.isspace():
                table[c] = SPACE
            elif cat == "Nd":
                table[c] = DIGIT
            elif ch in PROSE_PUNCTUATION:
                table[c] = PROSE
            elif cat[0] in "PS":
                table[c] = SYMBOL
            elif cat[0] == "L":
                table[c] = script[c]
        _TABLE = table
    return _TABLE


def char_stats(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(characters [D], words [D], class counts [D, N_CLASSES]) of a batch of texts, int64."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    classes = class_table()[codepoints("".join(texts))]
    owner = np.repeat(np.arange(len(texts)), lengths)
    counts = np.bincount(owner * N_CLASSES + classes, minlength=len(texts) * N_CLASSES)
    is_space = classes == SPACE
    word_start = ~is_space
    word_start[1:] &= is_space[:-1]
    starts = np.cumsum(lengths) - lengths
    nonempty = lengths > 0
    word_start[starts[nonempty]] = ~is_space[starts[nonempty]]  # a document starts a word afresh
    words = np.bincount(owner[word_start], minlength=len(texts))
    return lengths, words, counts.reshape(len(texts), N_CLASSES)


def _ratio(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    return np.divide(part, whole, out=np.zeros(len(part)), where=whole > 0)


def quality_reasons(
    texts: list[str], config: FilterConfig, languages: list[str] | None = None
) -> list[str | None]:
    """For each text, the name of the first rule it fails, or None when it passes them all.

    `languages` (ko/en/other per text) selects the Korean word-length bound; without it, the general one."""
    chars, words, counts = char_stats(texts)
    nonspace = chars - counts[:, SPACE]
    letters = counts[:, LETTER[SCRIPTS[0]] : OTHER].sum(axis=1)
    failed: list[tuple[str, np.ndarray]] = []
    c = config
    if c.length.enabled:
        failed.append(("length", (chars < c.length.min_chars) | (chars > c.length.max_chars)))
    if c.script.enabled:
        wanted = counts[:, [LETTER[s] for s in c.script.scripts]].sum(axis=1)
        failed.append(("script", (letters == 0) | (_ratio(wanted, letters) < c.script.min_ratio)))
    if c.word_length.enabled:
        mean = _ratio(nonspace, words)
        upper = np.full(len(texts), c.word_length.max_mean_chars)
        if languages is not None:
            upper[np.array([lang == "ko" for lang in languages], dtype=bool)] = (
                c.word_length.max_mean_chars_ko
            )
        failed.append(("word_length", (mean < c.word_length.min_mean_chars) | (mean > upper)))
    if c.symbols.enabled:
        failed.append(("symbols", _ratio(counts[:, SYMBOL], nonspace) > c.symbols.max_ratio))
    if c.digits.enabled:
        failed.append(("digits", _ratio(counts[:, DIGIT], nonspace) > c.digits.max_ratio))
    reasons: list[str | None] = [None] * len(texts)
    for name, mask in reversed(failed):  # the first failing rule wins
        for i in np.flatnonzero(mask):
            reasons[i] = name
    if c.repeated_lines.enabled:
        for i, text in enumerate(texts):
            if reasons[i] is None and "\n" in text and repeated_lines(text, c.repeated_lines):
                reasons[i] = "repeated_lines"
    if c.repeated_ngrams.enabled:
        judged = [
            i
            for i in range(len(texts))
            if reasons[i] is None and words[i] >= c.repeated_ngrams.min_words
        ]
        if judged:
            for k in np.flatnonzero(repeated_ngrams([texts[i] for i in judged], c.repeated_ngrams)):
                reasons[judged[k]] = "repeated_ngrams"
    return reasons


def repeated_lines(text: str, rule: RepeatedLinesRule) -> bool:
    """Gopher: too many lines, or too many characters in lines, that repeat an earlier line."""
    lines = [line for line in text.split("\n") if line.strip()]
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for line in lines:
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    total = sum(map(len, lines))
    return bool(lines) and (
        dup_lines / len(lines) > rule.max_duplicate_lines
        or dup_chars / max(total, 1) > rule.max_duplicate_line_chars
    )


def ngram_fractions(docs: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """For each document's words: (top [D, 3], dup [D, 6]) shares of word characters covered by the
    most frequent n-gram, n = 2..4 (0 unless it repeats), and by repeated occurrences of n-grams,
    n = 5..10 (first occurrences not counted). One numpy pass per n over the whole batch."""
    D = len(docs)
    per_doc = np.fromiter(map(len, docs), dtype=np.int64, count=D)
    words = [w for doc in docs for w in doc]
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    owner = np.repeat(np.arange(D), per_doc)  # document of each word
    ends = np.cumsum(per_doc)
    prefix = np.concatenate([[0], np.cumsum(lengths)])
    total = np.maximum(np.bincount(owner, weights=lengths, minlength=D), 1)
    top, dup = np.zeros((D, 3)), np.zeros((D, 6))
    for n in range(2, 11):
        pos = np.arange(max(len(words) - n + 1, 0))
        inside = pos + n <= ends[owner[pos]]  # the n-gram does not run into the next document
        pos = pos[inside]
        doc = owner[pos]
        key = window_hashes(ids, n)[inside] * np.uint64(0x9E3779B97F4A7C15) + doc.astype(np.uint64)
        first, count = _groups(key)
        key_doc = doc[first]
        if n <= 4:
            most = np.zeros(D, dtype=np.int64)
            np.maximum.at(most, key_doc, count)
            chars = (
                prefix[pos[first] + n] - prefix[pos[first]]
            )  # characters of each distinct n-gram
            longest = np.zeros(D, dtype=np.int64)  # among the most frequent n-grams, the longest
            np.maximum.at(longest, key_doc, np.where(count == most[key_doc], chars, 0))
            top[:, n - 2] = np.where(most > 1, longest * most / total, 0.0)
        else:
            repeat = np.ones(len(pos), dtype=bool)
            repeat[first] = False  # a first occurrence is not a repeat
            starts = pos[repeat]
            edges = np.bincount(starts, minlength=len(words) + 1) - np.bincount(
                starts + n, minlength=len(words) + 1
            )
            covered = np.cumsum(edges[: len(words)]) > 0
            dup[:, n - 5] = (
                np.bincount(owner[covered], weights=lengths[covered], minlength=D) / total
            )
    return top, dup


def _groups(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first position, count) of each distinct value of `key`; like np.unique(return_index=True,
    return_counts=True) but ~4x faster: an unstable sort, then the least position of each run."""
    perm = np.argsort(key)
    ordered = key[perm]
    starts = (
        np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        if len(key)
        else np.empty(0, np.int64)
    )
    return np.minimum.reduceat(perm, starts) if len(key) else perm, np.diff(
        np.append(starts, len(key))
    )


def repeated_ngrams(texts: list[str], rule: RepeatedNgramsRule) -> np.ndarray:
    """Gopher: the top 2-4-gram or the repeated 5-10-grams cover too many characters [D] bool."""
    top, dup = ngram_fractions([t.split() for t in texts])
    limits_top, limits_dup = (
        np.array(rule.max_top_ngram_chars),
        np.array(rule.max_duplicate_ngram_chars),
    )
    return (top[:, : len(limits_top)] > limits_top).any(axis=1) | (
        dup[:, : len(limits_dup)] > limits_dup
    ).any(axis=1)
