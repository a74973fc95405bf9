"""Normalized form and rolling window hashes: fast paths against naive ones, and their laws."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration.data import fingerprint
from orchestration.data.fingerprint import (
    codepoints,
    joined_windows,
    normalize,
    text_hash,
    window_hashes,
    window_owner,
)


def naive_hash(codes, start: int, width: int) -> int:
    return sum(int(codes[start + j]) * pow(fingerprint.BASE, j, 1 << 64) for j in range(width)) % (
        1 << 64
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello,  World!", "helloworld"),
        ("HELLO world", "helloworld"),
        ("안녕 하세요.", "안녕하세요"),
        ("\u1100\u1161\u11a8 학교", "각학교"),  # conjoining jamo compose (NFC)
        ("ᄀ-ᅡ", "가"),  # jamo brought together by dropping punctuation compose too
        ("Straße_x", "strassex"),
        ("12,345.6%", "123456"),
    ],
)
def test_normalize_examples(text, expected):
    assert normalize(text) == expected


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_is_idempotent(text):
    once = normalize(text)
    assert normalize(once) == once


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_normalize_ignores_spacing_case_and_punctuation(text):
    spaced = " ".join(text.upper()) + " ..."
    assert normalize(spaced) == normalize(text.upper())


def test_window_hashes_match_naive_and_survive_chunk_edges(monkeypatch):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 0x10FFFF, size=300).astype(np.uint32)
    monkeypatch.setattr(fingerprint, "CHUNK", 37)  # many chunks, windows straddling their edges
    h = window_hashes(codes, 50)
    assert len(h) == 251
    for i in (0, 1, 36, 37, 38, 100, 250):
        assert int(h[i]) == naive_hash(codes, i, 50)
    assert len(window_hashes(codes[:49], 50)) == 0


def test_equal_windows_hash_equal_wherever_they_are():
    text = "가나다라마바사아자차카타파하" * 10
    h = window_hashes(codepoints(text), 14)
    assert len(set(h[::14].tolist())) == 1 and len(set(h[:14].tolist())) == 14


def test_joined_windows_owner():
    texts = ["abcdef", "gh", "ijklmn"]
    joined, h, ends = joined_windows(texts, 3)
    assert joined == "abcdefghijklmn" and ends.tolist() == [6, 8, 14]
    owner, inside = window_owner(np.arange(len(h)), ends, 3)
    kept = [joined[i : i + 3] for i in np.flatnonzero(inside)]
    assert kept == ["abc", "bcd", "cde", "def", "ijk", "jkl", "klm", "lmn"]
    assert owner[np.flatnonzero(inside)].tolist() == [0, 0, 0, 0, 2, 2, 2, 2]
    # a start at or past the last text's end (owner == len(texts)) is inside none of them
    owner, inside = window_owner(np.array([13, 14, 20]), ends, 1)
    assert owner.tolist() == [2, 3, 3] and inside.tolist() == [True, False, False]


def test_lone_surrogates_pass_through():
    """Text decoded with surrogateescape, or JSON's unpaired \\ud800, is hashed, not refused."""
    assert codepoints("a\ud800b").tolist() == [0x61, 0xD800, 0x62]
    assert text_hash("a\ud800b") != text_hash("ab")


@pytest.mark.parametrize("text", ["", "hanyeong", "한영 데이터", "a\ud800"])
def test_text_hash_is_blake2b_in_64_bits(text):
    """Stable across processes and machines (unlike hash()): the exact-dedup key is 8 bytes of blake2b."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    assert text_hash(text) == int.from_bytes(digest, "little") < 1 << 64
