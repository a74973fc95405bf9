"""How well a tokenizer compresses a text, measured the same way for every tokenizer format.

Token boundaries are computed from each token's byte length, so a word is "one token" when no
token boundary falls inside it, and morpheme alignment compares those boundaries with Kiwi's.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

_WORD = re.compile(r"\S+")
_HAS_HANGUL = re.compile(r"[\uac00-\ud7a3]")


class Encoder(Protocol):
    """What the metrics need from a tokenizer (see `tokenizer.peers`)."""

    name: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    @property
    def token_bytes(self) -> list[bytes]: ...


def ksx1001_hangul() -> list[str]:
    """The 2,350 Hangul syllables of KS X 1001 (EUC-KR rows 0xB0-0xC8), the common ones."""
    return [bytes([row, col]).decode("euc-kr") for row in range(0xB0, 0xC9) for col in range(0xA1, 0xFF)]


@dataclass
class Compression:
    """Compression of one text by one tokenizer."""

    documents: int
    words: int
    chars: int
    bytes: int
    tokens: int
    tokens_per_word: float
    """EXAONE's "compression ratio": tokens per whitespace-separated word (lower is better)."""
    chars_per_token: float
    bytes_per_token: float
    single_token_words: float | None
    """Share of words that no token boundary cuts."""
    morpheme_precision: float | None = None
    """Share of token boundaries inside Korean words that fall on a Kiwi morpheme boundary."""
    morpheme_recall: float | None = None
    """Share of Kiwi morpheme boundaries inside Korean words that are token boundaries."""
    unaligned_documents: int = 0
    """Documents whose tokens do not spell the text byte for byte (a normalizer, <unk>)."""

    def to_dict(self) -> dict:
        return asdict(self)


def char_to_byte_offsets(text: str) -> np.ndarray:
    """offsets[i] = UTF-8 byte offset of character i; offsets[len(text)] = total bytes."""
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    widths = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)])


def token_boundaries(ids: list[int], lengths: np.ndarray, text_bytes: int, prefix_space: bool) -> np.ndarray | None:
    """Byte offsets where one token ends and the next begins, or None if tokens do not spell the text."""
    if not ids:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths[np.asarray(ids)])
    if prefix_space and ends[-1] == text_bytes + 1:
        ends = ends - 1  # SentencePiece's dummy prefix space is not in the text
    if ends[-1] != text_bytes:
        return None
    return ends[:-1]


def measure(
    encoder: Encoder,
    documents: list[str],
    morpheme_cuts: list[np.ndarray] | None = None,
    prefix_space: bool = False,
) -> Compression:
    """Compression of `documents`; `morpheme_cuts[i]` (byte offsets) enables the alignment scores."""
    ids_per_doc = encoder.encode_batch(documents)
    lengths = np.array([len(b) for b in encoder.token_bytes], dtype=np.int64)
    words = tokens = chars = nbytes = single = unaligned = aligned_words = 0
    hits = token_cuts = reference_cuts = 0
    for i, (text, ids) in enumerate(zip(documents, ids_per_doc)):
        offsets = char_to_byte_offsets(text)
        spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        words += len(spans)
        tokens += len(ids)
        chars += len(text)
        nbytes += int(offsets[-1])
        cuts = token_boundaries(ids, lengths, int(offsets[-1]), prefix_space)
        if cuts is None:
            unaligned += 1
            continue
        aligned_words += len(spans)
        if not spans:
            continue
        starts = offsets[[s for s, _ in spans]]
        ends = offsets[[e for _, e in spans]]
        inside = np.searchsorted(cuts, ends, "left") - np.searchsorted(cuts, starts, "right")
        single += int((inside == 0).sum())
        if morpheme_cuts is not None:
            korean = np.array([bool(_HAS_HANGUL.search(text, s, e)) for s, e in spans])
            ours = _inside_words(cuts, starts[korean], ends[korean])
            reference = _inside_words(morpheme_cuts[i], starts[korean], ends[korean])
            hits += len(np.intersect1d(ours, reference))
            token_cuts += len(ours)
            reference_cuts += len(reference)
    return Compression(
        documents=len(documents),
        words=words,
        chars=chars,
        bytes=nbytes,
        tokens=tokens,
        tokens_per_word=tokens / words if words else float("nan"),
        chars_per_token=chars / tokens if tokens else float("nan"),
        bytes_per_token=nbytes / tokens if tokens else float("nan"),
        single_token_words=single / aligned_words if aligned_words else None,
        morpheme_precision=hits / token_cuts if morpheme_cuts is not None and token_cuts else None,
        morpheme_recall=hits / reference_cuts if morpheme_cuts is not None and reference_cuts else None,
        unaligned_documents=unaligned,
    )


def _inside_words(cuts: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The cuts that fall strictly inside one of the words [start, end)."""
    if len(cuts) == 0 or len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    word = np.searchsorted(starts, cuts, "right") - 1
    valid = word >= 0
    valid[valid] &= cuts[valid] < ends[word[valid]]
    valid[valid] &= cuts[valid] > starts[word[valid]]
    return np.unique(cuts[valid])


def hangul_single_token_share(encoder: Encoder, prefix_space: bool = False) -> float:
    """Share of the 2,350 KS X 1001 Hangul syllables that encode, alone, to a single token."""
    syllables = ksx1001_hangul()
    table = encoder.token_bytes
    single = 0
    for ids in encoder.encode_batch(syllables):
        if prefix_space and ids and table[ids[0]] == b" ":
            ids = ids[1:]  # SentencePiece's dummy prefix, when it stays a token of its own
        single += len(ids) == 1
    return single / len(syllables)


def kiwi_cuts(documents: list[str], workers: int = 1) -> list[np.ndarray]:
    """Kiwi's morpheme boundaries of each document (in context), as byte offsets."""
    from kiwipiepy import Kiwi
    from kiwipiepy.const import Match

    kiwi = Kiwi(num_workers=max(1, workers))
    out = []
    for text, tokens in zip(documents, kiwi.tokenize(documents, match_options=Match(0))):
        offsets = char_to_byte_offsets(text)
        starts = sorted({t.start for t in tokens if 0 < t.start < len(text)})
        out.append(offsets[starts] if starts else np.zeros(0, dtype=np.int64))
    return out
