"""The matching form of a text and 64-bit hashes of its fixed-width character windows.

Decontamination (EXAONE 3.5: 50-character substrings, stride 1) and deduplication (exact hashes,
MinHash character shingles) compare texts in one normalized form: NFC, casefolded, with punctuation,
symbols and whitespace removed, so re-spaced, re-cased and re-punctuated copies compare equal.
Window hashes are a polynomial rolling hash modulo 2^64 computed with numpy: position i's hash is
sum_j c[i+j]·B^j, obtained from prefix sums of c[k]·B^k times B^-i (B is odd, so invertible).
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

# Everything that is not a letter or a digit (str.isalnum), and the underscore, goes.
_NOT_ALNUM = re.compile(r"[\W_]+")
BASE = 0x9E3779B97F4A7C15 | 1  # odd: invertible modulo 2^64
_INVERSE = pow(BASE, -1, 1 << 64)
CHUNK = 1 << 20  # windows hashed per numpy pass; bounds the temporary arrays to ~40 MB
_POWERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def normalize(text: str) -> str:
    """NFC, casefold, drop punctuation, symbols and whitespace: the form texts are matched in."""
    text = _NOT_ALNUM.sub("", unicodedata.normalize("NFC", text).casefold())
    # Removing punctuation can bring Hangul jamo together; compose them again (idempotence).
    return unicodedata.normalize("NFC", text)


def codepoints(text: str) -> np.ndarray:
    """The code points of `text` as uint32 [len(text)] (lone surrogates pass through)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B^k, B^-k) for k < n, uint64 modulo 2^64, cached by size."""
    if n not in _POWERS:
        pw = np.empty(n, dtype=np.uint64)
        inv = np.empty(n, dtype=np.uint64)
        pw[0] = inv[0] = 1
        pw[1:] = np.uint64(BASE)
        inv[1:] = np.uint64(_INVERSE)
        np.cumprod(pw, out=pw)  # unsigned overflow wraps: arithmetic modulo 2^64
        np.cumprod(inv, out=inv)
        _POWERS[n] = (pw, inv)
    return _POWERS[n]


def window_hashes(codes: np.ndarray, width: int) -> np.ndarray:
    """uint64 hash of every `width`-long window of `codes` [n] -> [max(0, n - width + 1)], stride 1."""
    n = len(codes) - width + 1
    if n <= 0:
        return np.empty(0, dtype=np.uint64)
    out = np.empty(n, dtype=np.uint64)
    span = CHUNK + width - 1
    pw, inv = _powers(span)
    for start in range(0, n, CHUNK):
        seg = codes[start : start + span].astype(np.uint64)
        m = len(seg) - width + 1
        prefix = np.cumsum(seg * pw[: len(seg)])  # prefix[k] = sum_{j<=k} c[j]·B^j
        sums = prefix[width - 1 :].copy()
        sums[1:] -= prefix[: m - 1]
        out[start : start + m] = sums * inv[:m]  # shift window i back to position 0
    return out


def text_hash(text: str) -> int:
    """A stable 64-bit hash of a string (blake2b), for exact-duplicate keys."""
    import hashlib

    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


def joined_windows(texts: list[str], width: int) -> tuple[str, np.ndarray, np.ndarray]:
    """Hash the windows of many texts in one pass: (joined text, hashes [n], ends [len(texts)]).

    Window i of the joined text lies inside text d when ends[d-1] <= i and i + width <= ends[d];
    windows that straddle two texts are hashed too and must be masked by the caller.
    """
    joined = "".join(texts)
    ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
    return joined, window_hashes(codepoints(joined), width), ends


def window_owner(
    positions: np.ndarray, ends: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """For window start positions: (index of the text each starts in, whether it ends in it too)."""
    owner = np.searchsorted(ends, positions, side="right")
    inside = positions + width <= ends[np.minimum(owner, len(ends) - 1)]
    return owner, inside & (owner < len(ends))
