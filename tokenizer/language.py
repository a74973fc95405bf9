"""Tell Korean from English (or other) text by counting Hangul and Latin letters."""

from __future__ import annotations

import re

LANGUAGES = ("ko", "en", "other")
# Hangul syllables, jamo and compatibility jamo.
_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_LATIN = re.compile(r"[A-Za-z]")
# Deciding on a prefix keeps detection O(1) per document; documents are rarely mixed past it.
PREFIX_CHARS = 4096


def detect_language(text: str) -> str:
    """'ko' when Hangul letters outnumber Latin ones, 'en' when Latin ones do, else 'other'."""
    head = text[:PREFIX_CHARS]
    hangul = len(_HANGUL.findall(head))
    latin = len(_LATIN.findall(head))
    if hangul == 0 and latin == 0:
        return "other"
    # One Hangul syllable carries about as much as 2-3 Latin letters; weigh it so a Korean
    # sentence with a few English terms stays Korean, and English with a Korean name stays English.
    return "ko" if 2.5 * hangul >= latin else "en"
