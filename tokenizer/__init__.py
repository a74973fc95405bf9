"""Korean/English byte-level BPE: training (morpheme-aware), reports, peers, export, streaming decode.

Exports resolve lazily so that importing a submodule (the CLI) does not load `tokenizers`.
"""

from hanyeong.errors import ConfigError, DataError, HanyeongError

__all__ = ["BBPETokenizer", "StreamDecoder", "HanyeongError", "ConfigError", "DataError"]


def __getattr__(name: str):
    if name == "BBPETokenizer":
        from tokenizer.bbpe import BBPETokenizer

        return BBPETokenizer
    if name == "StreamDecoder":
        from tokenizer.stream import StreamDecoder

        return StreamDecoder
    raise AttributeError(f"module 'tokenizer' has no attribute {name!r}")
