"""A trained hanyeong tokenizer: `tokenizer.json` + `tokenizer_config.json` in one directory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from hanyeong.errors import DataError
from hanyeong.files import write_atomic  # noqa: F401  (re-exported for callers of tokenizer.bbpe)
from tokenizer.pipeline import token_bytes_table
from tokenizer.stream import StreamDecoder

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def check_encodable(text: str) -> None:
    """Refuse text that has no UTF-8 form (lone surrogates) with the position of the problem."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(
            f"text has a lone surrogate U+{ord(text[err.start]):04X} at index {err.start}; "
            "it is not valid Unicode and cannot be encoded as UTF-8"
        ) from None


class BBPETokenizer:
    """Byte-level BPE with the hanyeong special block; a thin layer over `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None):
        self.hf = tokenizer
        self.config = config or {}
        self._token_bytes: list[bytes] | None = None

    @classmethod
    def load(cls, path: str | Path) -> BBPETokenizer:
        """From a directory holding tokenizer.json (and tokenizer_config.json), or the json file."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"{path}: no {TOKENIZER_FILE} there")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            raise DataError(f"{file}: not a tokenizers file ({err})") from None
        config_file = file.parent / CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls(tokenizer, config)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        write_atomic(directory / TOKENIZER_FILE, self.hf.to_str(pretty=True))
        write_atomic(directory / CONFIG_FILE, json.dumps(self.config, ensure_ascii=False, indent=2))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> list[int]:
        return sorted(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added (data preparation adds them)."""
        check_encodable(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        for text in texts:
            check_encodable(text)
        # encode_batch_fast skips character offsets, which ids do not need (~5% faster).
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def token_bytes(self) -> list[bytes]:
        if self._token_bytes is None:
            self._token_bytes = token_bytes_table(self.hf)
        return self._token_bytes

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self.token_bytes, self.special_ids if skip_special_tokens else ())
