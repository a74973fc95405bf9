"""Clean: NFC, control characters out, whitespace normalized; idempotent."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration.data.clean import clean_text
from orchestration.data.config import CleanConfig


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("\u1112\u1161\u11ab\u1100\u1173\u11af", "한글"),  # decomposed jamo -> NFC syllables
        ("cafe\u0301", "café"),
        ("a\x00b\x07c\x1bd", "abcd"),  # C0 controls out
        ("zero\u200bwidth\ufeff soft\u00adhyphen", "zerowidth softhyphen"),
        ("tabs\tand\u00a0nbsp\u3000ideographic", "tabs and nbsp ideographic"),
        ("  line one  \r\nline two\r\rline three  ", "line one\nline two\n\nline three"),
        ("para\n\n\n\n\nnext \u2028 sep", "para\n\nnext\nsep"),
        ("lone \ud800 surrogate", "lone surrogate"),
        (" \t\n\x00 ", ""),
    ],
)
def test_clean_examples(raw, cleaned):
    assert clean_text(raw) == cleaned


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(codec=None), max_size=80))
def test_clean_is_idempotent_and_leaves_nfc_without_controls(text):
    once = clean_text(text)
    assert clean_text(once) == once
    assert unicodedata.is_normalized("NFC", once)
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\n\t" for ch in once)
    assert "\t" not in once and once == once.strip()


def test_each_part_can_be_switched_off():
    raw = "cafe\u0301  x\x07"
    assert clean_text(raw, CleanConfig(nfc=False)) == "cafe\u0301 x"
    assert clean_text(raw, CleanConfig(drop_control=False)) == "café x\x07"
    assert clean_text(raw, CleanConfig(normalize_whitespace=False)) == "café  x"
