"""Decode ids one at a time without ever splitting a character (a Hangul syllable spans tokens)."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence


class StreamDecoder:
    """Feed ids with `step`; text comes out only when its UTF-8 bytes are complete.

    A byte-level token can end in the middle of a character: 한 is three bytes that BPE may put
    in two tokens. Bytes are held back until the character is whole, so streamed text never
    shows U+FFFD for a character that is merely unfinished, and the concatenated output equals
    the batch decode of the same ids (invalid bytes become U+FFFD in both, the same way).
    """

    def __init__(self, token_bytes: Sequence[bytes], skip_ids: Iterable[int] = ()):
        self._token_bytes = token_bytes
        self._skip = frozenset(skip_ids)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        """The text that became complete with this id (often '' mid-character)."""
        if token_id in self._skip:
            return ""
        if not 0 <= token_id < len(self._token_bytes):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self._token_bytes) - 1})")
        return self._utf8.decode(self._token_bytes[token_id])

    def flush(self) -> str:
        """End of stream: bytes of an unfinished character come out as U+FFFD, as in a batch decode."""
        return self._utf8.decode(b"", final=True)

    def decode(self, ids: Iterable[int]) -> str:
        """All of `ids` through the stream, flushed: equals the batch decode."""
        return "".join(self.step(i) for i in ids) + self.flush()
