"""Clean: Unicode NFC, control characters out, whitespace normalized.

This is where text is normalized: the tokenizer never rewrites text, so what the model sees is what
this step leaves. A document left empty is dropped (counted as `clean:empty`).
"""

from __future__ import annotations

import re
import unicodedata

from orchestration.data.config import CleanConfig

# Line separators of every kind, and vertical tab / form feed, become "\n".
_LINE_ENDS = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# C0/C1 controls but tab and newline; zero-width space, word joiner, BOM, soft hyphen; lone
# surrogates; noncharacters.
_CONTROL = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff\u00ad\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]+"
)
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace but newline: tabs, NBSP, ideographic space...
_SPACED_NEWLINE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, config: CleanConfig | None = None) -> str:
    """The cleaned text: controls out, NFC, whitespace normalized (each part per `config`)."""
    config = config or CleanConfig()
    if config.drop_control or config.normalize_whitespace:
        text = _LINE_ENDS.sub("\n", text)
    if config.drop_control:
        text = _CONTROL.sub("", text)
    if config.nfc:
        text = unicodedata.normalize("NFC", text)
    if config.normalize_whitespace:
        text = _SPACES.sub(" ", text)
        text = _SPACED_NEWLINE.sub("\n", text)
        text = _BLANK_LINES.sub("\n\n", text).strip()
    return text
