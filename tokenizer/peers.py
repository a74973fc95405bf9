"""Load other tokenizers to compare against, whatever format they ship in.

HF `tokenizer.json`; GPT-2 style `vocab.json` + `merges.txt` (or OpenAI's `encoder.json` +
`vocab.bpe`); tiktoken rank files (`*.tiktoken`, Llama 3/4 `tokenizer.model`); SentencePiece
`.model`. Each loads into a `Peer` with `encode_batch` and `token_bytes`, which the metrics use.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

from hanyeong.errors import DataError
from tokenizer.pipeline import token_bytes_table

# Split patterns of the rank-file encodings, by how many ranks the file holds.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
RANK_FILE_PATTERNS = {100_256: CL100K_PATTERN, 199_998: O200K_PATTERN, 128_000: LLAMA3_PATTERN, 200_000: O200K_PATTERN}
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass
class Peer:
    """A tokenizer under comparison: encode texts, and know the bytes of every token id."""

    name: str
    kind: str
    vocab_size: int
    prefix_space: bool = False  # SentencePiece adds a space in front of the text
    _encode: object = field(default=None, repr=False)
    _token_bytes: object = field(default=None, repr=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts)

    @property
    def token_bytes(self) -> list[bytes]:
        if callable(self._token_bytes):
            self._token_bytes = self._token_bytes()
        return self._token_bytes


def _hf_peer(name: str, tokenizer, kind: str) -> Peer:
    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return Peer(name, kind, tokenizer.get_vocab_size(), False, encode, lambda: token_bytes_table(tokenizer))


def load_hf_json(path: Path, name: str) -> Peer:
    from tokenizers import Tokenizer

    return _hf_peer(name, Tokenizer.from_file(str(path)), "tokenizer.json")


def load_bpe_files(vocab_path: Path, merges_path: Path, name: str) -> Peer:
    """GPT-2 style files; the pre-tokenizer follows tokenizer_config.json's class when present."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    config_path = vocab_path.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if config.get("tokenizer_class", "").startswith("Qwen2"):
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        # A vocabulary with no multi-digit token was trained on split digits (EXAONE): split them too.
        if not any(len(t) > 1 and t.isdigit() for t in vocab):
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    added = config.get("added_tokens_decoder", {})
    if added:
        from tokenizers import AddedToken

        tokenizer.add_tokens(
            [AddedToken(v["content"], special=v.get("special", False), normalized=False) for _, v in sorted(added.items(), key=lambda kv: int(kv[0]))]
        )
    return _hf_peer(name, tokenizer, "vocab.json+merges.txt")


def read_rank_file(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file: `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise DataError(f"{path}:{number}: not a tiktoken rank line") from None
    return ranks


def load_tiktoken(path: Path, name: str, pattern: str | None = None) -> Peer:
    import tiktoken

    ranks = read_rank_file(path)
    pattern = pattern or RANK_FILE_PATTERNS.get(len(ranks), CL100K_PATTERN)
    encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})

    def token_bytes() -> list[bytes]:
        table = [b""] * (max(ranks.values()) + 1)
        for token, rank in ranks.items():
            table[rank] = token
        return table

    return Peer(name, "tiktoken", len(ranks), False, encoding.encode_ordinary_batch, token_bytes)


def load_sentencepiece(path: Path, name: str) -> Peer:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(path))

    def token_bytes() -> list[bytes]:
        table = []
        for i in range(processor.get_piece_size()):
            piece = processor.id_to_piece(i)
            if processor.is_byte(i):
                table.append(bytes([int(piece[3:5], 16)]))  # <0xAB>
            elif processor.is_control(i) or processor.is_unknown(i):
                table.append(b"")
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    return Peer(name, "sentencepiece", processor.get_piece_size(), True, processor.encode, token_bytes)


def _looks_like_rank_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


def load_peer(spec: str | Path, name: str | None = None) -> Peer:
    """A tokenizer from a file or directory in any supported format; `name` defaults to its folder."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{spec}: no such tokenizer file or folder")
    name = name or (path.name if path.is_dir() else path.parent.name)
    if path.is_dir():
        candidates = [
            ("tokenizer.json", None),
            ("vocab.json", "merges.txt"),
            ("encoder.json", "vocab.bpe"),
        ]
        for first, second in candidates:
            if (path / first).is_file() and (second is None or (path / second).is_file()):
                if second is None:
                    return load_hf_json(path / first, name)
                return load_bpe_files(path / first, path / second, name)
        files = sorted(p for p in path.iterdir() if p.is_file() and (".tiktoken" in p.name or ".model" in p.name))
        if len(files) == 1:
            return load_peer(files[0], name)
        raise DataError(f"{path}: no tokenizer found (tokenizer.json, vocab.json+merges.txt, *.tiktoken, *.model)")
    if path.name.endswith(".json"):
        try:
            head = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise DataError(f"{path}: not valid JSON") from None
        if isinstance(head, dict) and "model" in head:
            return load_hf_json(path, name)
        merges = path.with_name("merges.txt")
        if merges.is_file():
            return load_bpe_files(path, merges, name)
        raise DataError(f"{path}: neither a tokenizer.json nor a vocab.json with merges.txt beside it")
    if _looks_like_rank_file(path):
        return load_tiktoken(path, name)
    try:
        return load_sentencepiece(path, name)
    except (RuntimeError, OSError):
        raise DataError(f"{path}: not a tokenizer.json, tiktoken rank file or SentencePiece model") from None

