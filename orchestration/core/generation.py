"""The backend-neutral halves of `generate`: prompt checks, left padding, which ids are never
sampled, and where each row stops. Both backends call these and keep only the model loop.

Never sampled (issue 13): the tokenizer's special block (tokenizer/specials.py: ids below the first
byte id: [PAD] [BOS] [EOS] [UNK], the chat roles, <thought> </thought>, the reserved slots) is not
text, so generation masks it to -inf before sampling AND before the greedy argmax, except the stop
ids it is given (a stop id ends a row) and the ids the caller allows as content. `<thought>` and
`</thought>` are content for a reasoning model (EXAONE Deep), but only a caller that trained one
knows that: it passes them in `allow_ids`; by default the whole block is suppressed. A vocabulary
smaller than the block plus the 256 byte tokens holds no hanyeong tokenizer (tokenizer.train refuses
one), so there nothing is suppressed by default. Ids at and above the tokenizer's real size, when
the model's vocabulary is larger (rounded up), are never sampled either (`tokenizer_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hanyeong.errors import ConfigError, DataError
from tokenizer.specials import SPECIAL_BLOCK

BYTE_TOKENS = 256  # the byte ids that follow the special block in a hanyeong vocabulary


def suppressed_ids(
    vocab_size: int,
    stop_ids: Sequence[int] = (),
    allow_ids: Sequence[int] = (),
    special_block: int = SPECIAL_BLOCK,
    tokenizer_size: int | None = None,
) -> np.ndarray:
    """The ids generation never samples, sorted int64: the special block [0, special_block) when
    the vocabulary can hold a hanyeong tokenizer, and [tokenizer_size, vocab_size); less the stop
    and allowed ids."""
    ids = set()
    if vocab_size >= special_block + BYTE_TOKENS:
        ids.update(range(special_block))
    if tokenizer_size is not None:
        ids.update(range(tokenizer_size, vocab_size))
    ids -= {int(i) for i in (*stop_ids, *allow_ids)}
    return np.array(sorted(ids), np.int64)


@dataclass
class Prompts:
    """Left-padded prompts and what the sampling loop needs besides the model."""

    tokens: np.ndarray
    """int64 [B, L]: each prompt at the right end, 0 before it."""
    segments: np.ndarray
    """int64 [B, L]: 0 on padding, 1 on the prompt: no prompt sees padding and each starts at RoPE
    position 0, exactly as if it were generated alone."""
    suppress: np.ndarray
    """bool [vocab]: True where the id is never sampled (masked to -inf)."""
    capacity: int
    """KV cache positions: L + max_new_tokens."""


def prepare(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    vocab_size: int,
    max_seq_len: int,
    stop_ids: Sequence[int] = (),
    allow_ids: Sequence[int] = (),
    suppress_ids: Sequence[int] | None = None,
) -> Prompts:
    """Check the prompts (DataError: an empty one or an id outside the vocabulary; ConfigError:
    longer than max_seq_len with the new tokens), left-pad them, and the suppressed ids' mask:
    `suppress_ids` (None: suppressed_ids(vocab_size, ...); (): none), less stop and allowed ids."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise DataError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise DataError(
                f"generate: prompt {i} has an id outside the vocabulary [0, {vocab_size})"
            )
    B, L = len(prompts), max(len(p) for p in prompts)
    if L + max_new_tokens > max_seq_len:
        raise ConfigError(f"generate: {L} prompt + {max_new_tokens} new tokens exceed spec.max_seq_len "
                          f"({max_seq_len})")  # fmt: skip
    tokens, segments = np.zeros((B, L), np.int64), np.zeros((B, L), np.int64)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p) :], segments[i, L - len(p) :] = p, 1
    if suppress_ids is None:
        suppress_ids = suppressed_ids(vocab_size, stop_ids, allow_ids)
    suppress = np.zeros(vocab_size, bool)
    suppress[[i for i in suppress_ids if 0 <= i < vocab_size]] = True
    suppress[[i for i in (*stop_ids, *allow_ids) if 0 <= i < vocab_size]] = False
    if suppress.all():
        raise ConfigError(f"generate: all {vocab_size} ids are suppressed; nothing can be sampled")
    return Prompts(tokens, segments, suppress, L + max_new_tokens)


class Rows:
    """The new tokens of each row; a row ends at its first stop id, which it keeps."""

    def __init__(self, n: int, stop_ids: Sequence[int] = ()):
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.stop = {int(i) for i in stop_ids}

    def add(self, next_ids: Sequence[int]) -> bool:
        """One sampled id per row (ignored for a finished row); True once every row has stopped."""
        for i, t in enumerate(next_ids):
            if not self.done[i]:
                self.tokens[i].append(int(t))
                self.done[i] = t in self.stop
        return all(self.done)


# ---- per-row random streams: a sample's tokens independent of its batch ------------------------


def sample_key(seed: int, prompt: int, sample: int) -> int:
    """The 128-bit key of sample `sample` of prompt `prompt` under `seed` (blake2b of the three):
    the same in every process, batch and machine."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}/{prompt}/{sample}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


class RowUniforms:
    """One uniform in [0, 1) per row per step, each row from its own Philox stream (keyed by
    `sample_key`): sampling by inverse CDF with these makes a row's tokens a function of its key and
    its own logits only, whatever rows share its batch."""

    def __init__(self, keys: Sequence[int]):
        self.streams = [np.random.Generator(np.random.Philox(key=int(k))) for k in keys]

    def next(self) -> np.ndarray:
        """float64 [B]: the next uniform of every row."""
        return np.array([s.random() for s in self.streams])


def row_streams(row_seeds: Sequence[int] | None, rows: int) -> RowUniforms | None:
    """The rows' uniform streams (None without keys); ConfigError unless one key per row."""
    if row_seeds is None:
        return None
    if len(row_seeds) != rows:
        raise ConfigError(f"generate: {len(row_seeds)} row_seeds for {rows} prompts; give one per prompt")
    return RowUniforms(row_seeds)
