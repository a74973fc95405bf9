"""Assemble a byte-level BPE tokenizer from plain, serializable `tokenizers` stages.

pre-tokenizer (split regex with the digit rule) -> byte-level BPE -> byte-level decoder, no
normalizer: the tokenizer never rewrites text, so decode(encode(s)) == s. The saved file needs
neither Kiwi nor hanyeong to load.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from tokenizer.morphemes import BOUNDARY

# The cl100k / Llama 3 split: letters keep one leading non-letter ("(서울", " word"), numbers are
# split off by the digit rule, whitespace runs stay whole except the space before a word.
_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{DIGITS}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT_RULES = {
    "1": "",  # each digit its own token (EXAONE, Llama 2)
    "3": "{1,3}",  # up to three digits (Llama 3, GPT-4)
}


def split_pattern(digits: str = "1") -> str:
    """The pre-tokenizer regex for a digit rule ('1' or '3'); tiktoken exports reuse it verbatim."""
    if digits not in DIGIT_RULES:
        raise ValueError(f"digit rule must be one of {sorted(DIGIT_RULES)}, got {digits!r}")
    return _PATTERN.replace("{DIGITS}", DIGIT_RULES[digits])


def pre_tokenizer(digits: str = "1") -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern(digits)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def training_pre_tokenizer(digits: str = "1") -> pre_tokenizers.PreTokenizer:
    """The use-time pre-tokenizer, after cutting (and dropping) morpheme BOUNDARY marks."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(BOUNDARY, behavior="removed"), pre_tokenizer(digits)]
    )


def rank_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every merge a rank-based BPE (tiktoken) would make, ordered by the rank of its result.

    A trained merge list holds one way to build each token; tiktoken merges any two adjacent
    tokens whose concatenation has a rank. Listing every split of every token (as transformers'
    tiktoken converter does) makes both encode the same.
    """
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in vocab.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def assemble(vocab: dict[str, int], specials: list[str], digits: str = "1") -> Tokenizer:
    """A byte-level BPE tokenizer over `vocab` (byte-level strings -> ids) with `specials` added.

    Special tokens must already be in `vocab` with the lowest ids.
    """
    bpe_vocab = {t: i for t, i in vocab.items() if t not in set(specials)}
    # ignore_merges: a pre-token that is itself in the vocabulary is that one token, as tiktoken
    # does; BPE would build the same token (checked against the tiktoken export) but slower.
    tokenizer = Tokenizer(models.BPE(vocab, rank_merges(bpe_vocab), fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizer(digits)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_CHAR_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def byte_level_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for; a token with other characters is its own UTF-8.

    This mirrors the tokenizers ByteLevel decoder, so special tokens decode to their text.
    """
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def token_bytes_table(tokenizer: Tokenizer) -> list[bytes]:
    """bytes of every id of a byte-level tokenizer, indexed by id."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    table = []
    for i in range(size):
        token = tokenizer.id_to_token(i)
        table.append(byte_level_bytes(token) if token is not None else b"")
    return table
