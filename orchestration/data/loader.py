"""The training data loader: a weighted mixture of prepared datasets, packed into fixed-length rows.

A stage reads a mixture (issue #5): sources with token weights, plus replay of an earlier stage's
data at a fraction (the long-context stage). Documents (BOS, tokens..., EOS, as prepared) are
concatenated into one stream and cut into rows of seq_len + 1 tokens; a document cut at a row's end
continues at the start of the next row, so nothing is dropped or repeated. `segment_ids` number the
documents inside each row, so attention never crosses them. A source whose shards carry a `loss_mask`
column (chat data, orchestration/data/chat.py: 1 on assistant tokens) has it carried, token by token,
into `Batch.loss_mask`, combined with the padding mask; a source without one counts every token.

The order is a pure function of the seed and two counters, so the cursor is a handful of integers:
- which source the d-th document comes from: block d // DRAW_BLOCK of a counter-based RNG
  (Philox keyed by seed and block number), drawn with probability weight / mean document length,
  so that each source's share of *tokens* converges to its weight;
- which document that is: the source's k-th draw is position k % n of a seeded permutation of its
  n documents for epoch k // n (Philox keyed by seed, source and epoch).

HELD-OUT DOCUMENTS: `hold_out` documents of each source (at most a tenth) never reach a row; they
are the validation documents of [stage.eval]. They are drawn by the source's key alone (not the run
seed), so every stage and run that reads the source holds out the same ones, and n of them are the
first n of any larger count.

MEMORY (issue #20): bounded by the batch, not the dataset. What stays in memory is O(documents):
int64 offsets and the current epoch's int32 permutation, 12 bytes a document (a source holding
documents out keeps their index too). A
batch reads each document piece it packs with one pread. With `rows_of=(rank, world)` a rank walks
the whole global batch by lengths (the cursor is the global one) and reads the tokens of its own rows
only: every rank of a group draws the same batches, each keeps and reads its share.

THE TOKEN CACHE (orchestration/data/token_cache.py): each shard is decoded once per machine into plain
files the loader reads by position; opening a source costs O(documents).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hanyeong.errors import CheckpointError, ConfigError, DataError
from orchestration.core.batch import Batch
from orchestration.core.config import build
from orchestration.data.manifest import MANIFEST, read_manifest
from orchestration.data.token_cache import TokenFile, default_cache_dir, open_source

CURSOR_FORMAT, CURSOR_VERSION = "hanyeong-data-cursor", 1
DRAW_BLOCK = 1024  # source draws per RNG block; part of the order, so never change it silently
PAD_ID = 0  # tokenizer/specials.py: [PAD] is id 0


# ---- config: [stages.data] and its [[sources]] / [[replay]] tables -----------------------------


@dataclass(frozen=True)
class SourceWeight:
    """One entry of a mixture: a source of a prepared dataset and its share of tokens."""

    dataset: str
    """Directory of a prepared dataset (it holds manifest.json); relative to the loader's root."""
    source: str = "*"
    """A source of that dataset, or '*' for all of them, each in proportion to its tokens."""
    weight: float = 1.0
    """Relative share of tokens; the entries' weights are normalised to sum to 1 (less replay)."""

    def __post_init__(self) -> None:
        _check_names(self)
        if not 0 < self.weight < math.inf:
            raise ConfigError(f"weight must be a positive number, got {self.weight!r}")


@dataclass(frozen=True)
class ReplaySource:
    """Replay of an earlier stage's data at a fixed fraction of all tokens (long-context stage)."""

    dataset: str
    """Directory of the earlier stage's prepared dataset."""
    fraction: float
    """Share of all tokens drawn from it, in (0, 1); the sources share what is left."""
    source: str = "*"
    """A source of that dataset, or '*' for all of them, each in proportion to its tokens."""

    def __post_init__(self) -> None:
        _check_names(self)
        if not 0 < self.fraction < 1:
            raise ConfigError(f"fraction must be a number in (0, 1), got {self.fraction!r}")


@dataclass(frozen=True)
class MixtureConfig:
    """What a stage reads: weighted sources, optional replay, and how documents are packed."""

    sources: tuple[SourceWeight, ...]
    """The mixture's entries ([[sources]] tables); at least one."""
    replay: tuple[ReplaySource, ...] = ()
    """Earlier stages' data replayed at a fraction ([[replay]] tables); fractions sum below 1."""
    split_documents: bool = True
    """Continue a document cut at a row's end in the next row (pretraining). False: start each
    document on a fresh row and pad the rest with [PAD] (loss_mask 0), as SFT wants; a document
    longer than a row still fills whole rows. In a recipe the stage's kind gives the default
    (orchestration/pipeline/kinds.py: whole conversations for sft)."""
    hold_out: int | None = None
    """Documents per source kept out of training (at most a tenth of each source's): the
    validation documents [stage.eval] scores. None: in a recipe, [stage.eval]'s `documents` when
    the stage evaluates, else 0 (orchestration/pipeline/stage_config.py); for a bare loader, 0."""

    def __post_init__(self) -> None:
        if self.hold_out is not None and (isinstance(self.hold_out, bool) or not isinstance(self.hold_out, int)
                                          or self.hold_out < 0):  # fmt: skip
            raise ConfigError(f"hold_out must be an integer >= 0, got {self.hold_out!r}")
        if not self.sources:
            raise ConfigError("sources: needs at least one entry")
        total = sum(r.fraction for r in self.replay)
        if total >= 1:
            raise ConfigError(f"replay: fractions sum to {total:g}; they must sum below 1")

    @classmethod
    def from_dict(cls, data: dict, where: str = "mixture") -> MixtureConfig:
        """From a TOML/JSON table; unknown keys, wrong types and bad values are a ConfigError."""
        return build(cls, data, where)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_names(entry) -> None:
    if not entry.dataset:
        raise ConfigError(f"dataset must be a directory path, got {entry.dataset!r}")
    if not entry.source:
        raise ConfigError(f"source must be a source name or '*', got {entry.source!r}")


# ---- datasets: manifests checked first, then each source opened from the token cache -----------


@dataclass
class LoadedSource:
    """One source of a prepared dataset as the mixture reads it: its documents' offsets in memory,
    their tokens in a `TokenFile` over its shards' cache files (an int32 array works too)."""

    key: str
    """'<dataset directory name>/<source>': the name in the cursor and in the RNG keys."""
    tokens: TokenFile | np.ndarray = field(repr=False)
    """int32 [total tokens]: every document, BOS ... EOS, back to back; sliced, never held whole."""
    offsets: np.ndarray = field(repr=False)
    """int64 [documents + 1]: document i is tokens[offsets[i]:offsets[i + 1]]."""
    weight: float
    """Normalised share of the mixture's tokens."""
    masks: TokenFile | np.ndarray | None = field(default=None, repr=False)
    """int8 [total tokens] aligned with `tokens`: the shards' loss_mask column; None = no column."""
    held: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    """int64, sorted: the documents kept out of training (`MixtureConfig.hold_out`)."""

    def __post_init__(self) -> None:
        # The documents training draws from (the cursor counts these); None: all of them, so that
        # a source holding nothing out keeps no second array of its document count.
        self.train = None
        if len(self.held):
            kept = np.ones(len(self.offsets) - 1, bool)
            kept[self.held] = False
            self.train = np.flatnonzero(kept)

    @property
    def documents(self) -> int:
        """Documents training draws from (held-out ones excluded)."""
        return len(self.offsets) - 1 - len(self.held)


def held_documents(key: str, documents: int, count: int) -> np.ndarray:
    """The `count` documents (at most a tenth of them) a source keeps out of training, sorted:
    the first of a permutation keyed by the source's key alone (see HELD-OUT DOCUMENTS)."""
    count = min(count, documents // 10)
    return np.sort(philox(0, "held-out", key).permutation(documents)[:count]) if count else np.zeros(0, np.int64)


def resolve(mixture: MixtureConfig, root: str | Path | None = None) -> tuple[dict, dict]:
    """Check the mixture against the manifests: {(dataset dir, source): token share}, tokenizer."""
    root, weights, tokenizers = Path(root or "."), {}, {}
    kept = 1 - sum(r.fraction for r in mixture.replay)  # what replay leaves to the sources
    total = sum(e.weight for e in mixture.sources)
    entries = [(f"mixture.sources[{i}]", e, e.weight * kept / total)
               for i, e in enumerate(mixture.sources)]  # fmt: skip
    entries += [(f"mixture.replay[{i}]", e, e.fraction) for i, e in enumerate(mixture.replay)]
    for where, entry, share in entries:
        directory = (root / entry.dataset).resolve()
        manifest = dataset_manifest(directory, f"{where}.dataset")
        tokenizers[directory], known = manifest.get("tokenizer", {}), manifest["sources"]
        if entry.source != "*" and entry.source not in known:
            known_names = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"{where}.source: no source {entry.source!r} in {directory}; "
                              f"known: {known_names}")  # fmt: skip
        names = sorted(known) if entry.source == "*" else [entry.source]
        try:
            tokens = {name: int(known[name]["tokens"]) for name in names}
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{directory}/manifest.json: no token count ({err!r})") from None
        if sum(tokens.values()) == 0:
            raise DataError(f"{directory}/manifest.json: {', '.join(names)}: no tokens")
        for name in names:  # '*': each source in proportion to its tokens; duplicates add up
            part = share * tokens[name] / sum(tokens.values())
            weights[directory, name] = weights.get((directory, name), 0.0) + part
    _check_same_tokenizer(tokenizers)
    seen = {}
    for directory, _ in weights:
        if seen.setdefault(directory.name, directory) != directory:
            raise ConfigError(f"mixture: datasets {seen[directory.name]} and {directory} share a "
                              "directory name, which the cursor keys use; rename one")  # fmt: skip
    return {k: w for k, w in weights.items() if w > 0}, next(iter(tokenizers.values()))


def _key(directory: Path, source: str) -> str:
    return f"{directory.name}/{source}"


def dataset_manifest(directory: Path, where: str) -> dict:
    """The manifest of the dataset a mixture entry names; no dataset there is a ConfigError at `where`."""
    if not (directory / MANIFEST).is_file():
        raise ConfigError(f"{where}: no prepared dataset at {directory} (no {MANIFEST})")
    return read_manifest(directory)


def _check_same_tokenizer(tokenizers: dict[Path, dict]) -> None:
    seen = {}
    for directory, tokenizer in tokenizers.items():
        ids = tuple(tokenizer.get(k) for k in ("vocab_size", "bos_id", "eos_id"))
        seen.setdefault(ids, directory)
    if len(seen) > 1:
        listed = "; ".join(f"{d}: vocab_size, bos_id, eos_id = {ids}" for ids, d in seen.items())
        raise ConfigError(f"mixture: datasets were tokenized differently ({listed})")


# ---- order: counter-based draws, seeded permutations per epoch --------------------------------


def philox(seed: int, *names) -> np.random.Generator:
    """A generator keyed by (seed, names...): the same stream in every process and machine."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *names))).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def draw_sources(seed: int, block: int, cdf: np.ndarray) -> np.ndarray:
    """Source index of draws [block * DRAW_BLOCK, (block + 1) * DRAW_BLOCK): int64 [DRAW_BLOCK]."""
    u = philox(seed, "draws", block).random(DRAW_BLOCK)
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def permutation(seed: int, key: str, epoch: int, n: int) -> np.ndarray:
    """The order of a source's n documents in `epoch`: int32 [n] (Generator.permutation(n)'s order:
    it is arange(n) shuffled, here in place in 4 bytes a document instead of 8)."""
    if n == 1:
        return np.zeros(1, np.int32)
    order = np.arange(n, dtype=np.int32)
    philox(seed, "epoch", key, epoch).shuffle(order)
    return order


# ---- the loader ---------------------------------------------------------------------------------


class MixtureLoader:
    """Yields `Batch`es of `batch_rows` rows of `seq_len` tokens packed from a mixture, forever.

    `seq_len` and `batch_rows` may change between batches (a sequence-length ramp): the next batch
    cuts rows of the new length from the same stream position. `state()` is the cursor for
    trainer_state.json's `data_cursor`; `load_state()` (or `state=`) resumes exactly there.
    `rows_of=(rank, world)`: each batch is that rank's rows of the global batch (see MEMORY).
    `cache_dir`: the token cache the sources' shards are read from (default_cache_dir()).
    """

    def __init__(self, mixture: MixtureConfig, seq_len: int, batch_rows: int, seed: int = 0,
                 state: dict | None = None, root: str | Path | None = None,
                 rows_of: tuple[int, int] | None = None, cache_dir: str | Path | None = None) -> None:  # fmt: skip
        for name, value in (("seq_len", seq_len), ("batch_rows", batch_rows), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (name != "seed"):
                kind = "an integer >= 0" if name == "seed" else "a positive integer"
                raise ConfigError(f"{name} must be {kind}, got {value!r}")
        self.mixture, self.seq_len, self.batch_rows, self.seed = mixture, seq_len, batch_rows, seed
        self.rows_of = rows_of
        weights, tokenizer = resolve(mixture, root)
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.sources = []
        # Sorted by key, not by path: the order must not depend on where the datasets are.
        for (directory, name), weight in sorted(weights.items(), key=lambda kv: _key(*kv[0])):
            tokens, offsets, masks = open_source(directory, name, tokenizer, cache_dir)
            key = _key(directory, name)
            held = held_documents(key, len(offsets) - 1, mixture.hold_out or 0)
            self.sources.append(LoadedSource(key, tokens, offsets, weight, masks, held))
        self.masked = any(s.masks is not None for s in self.sources)
        self.pad_id = int(tokenizer.get("pad_id", PAD_ID))
        # Documents are drawn with probability ∝ weight / mean length, so token shares = weights.
        # A document's start and length come from the offsets (no per-document array besides them).
        p = []
        for s in self.sources:
            held_tokens = int((s.offsets[s.held + 1] - s.offsets[s.held]).sum())
            p.append(s.weight * s.documents / (int(s.offsets[-1]) - held_tokens))
        p = np.array(p)
        self._cdf = np.cumsum(p / p.sum())
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        self._tokens = 0
        self._start(0, 0, np.zeros(len(self.sources), np.int64))
        if state is not None:
            self.load_state(state)

    @property
    def rows_of(self) -> tuple[int, int] | None:
        """(rank, world): next_batch returns only the rows `rank_rows(batch, rank, world)`
        (orchestration/core/parallel.py) keeps of the global batch, reading only their tokens; the
        cursor still walks the whole global batch. None: every row."""
        return self._rows_of

    @rows_of.setter
    def rows_of(self, value: tuple[int, int] | None) -> None:
        if value is not None:
            ok = isinstance(value, (tuple, list)) and len(value) == 2
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if not (ok and 0 <= value[0] < value[1]):
                raise ConfigError("rows_of must be (rank, world) with 0 <= rank < world, "
                                  f"got {value!r}")  # fmt: skip
            value = (int(value[0]), int(value[1]))
        self._rows_of = value

    @property
    def weights(self) -> dict[str, float]:
        """Normalised token share of each source, by cursor key."""
        return {s.key: s.weight for s in self.sources}

    @property
    def tokens_delivered(self) -> int:
        """Document tokens put into rows so far ([PAD] excluded)."""
        return self._tokens

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def next_batch(self) -> Batch:
        """B = batch_rows rows (under rows_of, this rank's share of them: rank_rows's rows):
        inputs, targets, segment_ids int32 [B, seq_len] (+ loss_mask).

        loss_mask is None when every target counts (no padding, no masked source); else float32,
        0 on padding and where a source's loss_mask column is 0.
        """
        rows, filled, starts, masks = self._fill(self.batch_rows, self.seq_len + 1)
        pad = np.arange(rows.shape[1]) >= filled[:, None]  # [B, T + 1]
        # Number the documents of each row from 0; a document continued from the row before is 0,
        # and padding is a segment of its own after the last document.
        segments = np.cumsum(starts, axis=1, dtype=np.int32) - starts[:, :1] + pad
        loss_mask = None if self.mixture.split_documents else (~pad).astype(np.float32)
        if masks is not None:
            loss_mask = ((masks != 0) & ~pad).astype(np.float32)
        return Batch.from_tokens(rows, loss_mask=loss_mask, segment_ids=segments)

    # -- packing --

    def _fill(self, n_rows: int, width: int) -> tuple[np.ndarray, ...]:
        """This rank's rows int32 [B, width] of the n_rows cut from the stream (B = n_rows, or its
        share under rows_of), tokens per row [B], a bool [B, width] that is true where a document
        starts, and the sources' loss_mask int8 [B, width] (1 for sources without one; None when no
        source has one). Rows of other ranks advance the cursor by lengths alone: no token is read."""
        lo, hi = self._local_rows(n_rows)
        rows = np.full((hi - lo, width), self.pad_id, np.int32)
        masks = np.ones((hi - lo, width), np.int8) if self.masked else None
        starts = np.zeros((hi - lo, width), bool)
        filled = np.zeros(hi - lo, np.int64)
        split, delivered = self.mixture.split_documents, 0
        for r in range(n_rows):
            column, mine = 0, lo <= r < hi
            while column < width:  # one document piece per iteration, never one token
                i = self._index
                left, space = self._length[i] - self._offset, width - column
                if left > space and not split and column > 0:
                    break  # keep the document whole: pad this row, start it on the next
                take = min(left, space)
                if mine:
                    begin, source = self._begin[i] + self._offset, self.sources[self._source[i]]
                    rows[r - lo, column : column + take] = source.tokens[begin : begin + take]
                    if masks is not None and source.masks is not None:
                        masks[r - lo, column : column + take] = source.masks[begin : begin + take]
                    starts[r - lo, column] = self._offset == 0
                column, self._offset = column + take, self._offset + take
                if self._offset == self._length[i]:
                    self._next_document()
            if mine:
                filled[r - lo] = column
            delivered += column
        self._tokens += delivered
        return rows, filled, starts, masks

    def _local_rows(self, n_rows: int) -> tuple[int, int]:
        """Rows [lo, hi) of a global batch of n_rows this loader returns: np.array_split's share,
        as rank_rows takes it."""
        if self._rows_of is None:
            return 0, n_rows
        rank, world = self._rows_of
        size, extra = divmod(n_rows, world)
        lo = rank * size + min(rank, extra)
        return lo, lo + size + (rank < extra)

    def _next_document(self) -> None:
        self._offset, self._index = 0, self._index + 1
        if self._index == DRAW_BLOCK:
            counts = self._counts + np.bincount(self._choices, minlength=len(self.sources))
            self._start(self._block + 1, 0, counts)

    def _start(self, block: int, index: int, counts: np.ndarray) -> None:
        """Lay out draws `index`.. of block `block`, given each source's draws before `index`."""
        self._choices = draw_sources(self.seed, block, self._cdf)
        self._block, self._index, self._offset = block, index, 0
        # Draws of each source before this block (under this mixture's draws): state() adds back.
        self._counts = counts - np.bincount(self._choices[:index], minlength=len(self.sources))
        documents = np.zeros(DRAW_BLOCK, np.int64)
        begin, length = np.zeros(DRAW_BLOCK, np.int64), np.ones(DRAW_BLOCK, np.int64)
        for s, source in enumerate(self.sources):
            where = index + np.flatnonzero(self._choices[index:] == s)
            k, done, n = int(counts[s]), 0, source.documents
            while done < len(where):  # the source's next draws, one epoch's run at a time
                epoch, position = divmod(k, n)
                take = min(n - position, len(where) - done)
                order = self._permutation(s, epoch)
                documents[where[done : done + take]] = order[position : position + take]
                done, k = done + take, k + take
            drawn = documents[where] if source.train is None else source.train[documents[where]]
            begin[where] = source.offsets[drawn]
            length[where] = source.offsets[drawn + 1] - begin[where]
            for old in [key for key in self._permutations if key[0] == s and key[1] < k // n]:
                del self._permutations[old]
        # Python lists: _fill reads them one document at a time, faster than numpy scalars.
        self._source, self._begin = self._choices.tolist(), begin.tolist()
        self._length = length.tolist()

    def _permutation(self, s: int, epoch: int) -> np.ndarray:
        if (s, epoch) not in self._permutations:
            key, n = self.sources[s].key, self.sources[s].documents
            self._permutations[s, epoch] = permutation(self.seed, key, epoch, n)  # int32, no copy
        return self._permutations[s, epoch]

    # -- the cursor --

    def state(self) -> dict:
        """The cursor, JSON-serialisable: draws so far, the offset inside the current document,
        tokens delivered, and per source the epoch and position of its next document."""
        before = np.bincount(self._choices[: self._index], minlength=len(self.sources))
        sources = {}
        for source, k in zip(self.sources, (self._counts + before).tolist()):
            epoch, position = divmod(k, source.documents)
            counters = {"epoch": epoch, "position": position, "documents": source.documents}
            sources[source.key] = {**counters, "weight": source.weight}
        return {"format": CURSOR_FORMAT, "version": CURSOR_VERSION, "seed": self.seed,
                "documents_drawn": self._block * DRAW_BLOCK + self._index, "offset": self._offset,
                "tokens_delivered": self._tokens, "sources": sources}  # fmt: skip

    def load_state(self, state: dict) -> None:
        """Resume at a cursor from `state()` of a loader with the same mixture and seed."""
        try:
            if (state["format"], state["version"]) != (CURSOR_FORMAT, CURSOR_VERSION):
                raise CheckpointError(f"data cursor: {state['format']!r} v{state['version']}, "
                                      f"expected {CURSOR_FORMAT!r} v{CURSOR_VERSION}")  # fmt: skip
            counters = ("documents_drawn", "offset", "tokens_delivered")
            drawn, offset, tokens = (int(state[k]) for k in counters)
            seed, entries = state["seed"], dict(state["sources"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"data cursor: malformed ({err!r})") from None
        if seed != self.seed:
            raise CheckpointError(f"data cursor: made with seed {seed}, not {self.seed}")
        keys = sorted(s.key for s in self.sources)
        if sorted(entries) != keys:
            raise CheckpointError(f"data cursor: made for sources {', '.join(sorted(entries))}; "
                                  f"this mixture has {', '.join(keys)}")  # fmt: skip
        counts = np.array([_draws(entries[s.key], s) for s in self.sources], np.int64)
        if counts.sum() != drawn:
            raise CheckpointError(f"data cursor: documents_drawn {drawn} is not the sources' sum")
        self._start(*divmod(drawn, DRAW_BLOCK), counts)
        if not 0 <= offset < self._length[self._index]:
            raise CheckpointError(f"data cursor: offset {offset} is outside the current document")
        self._offset, self._tokens = offset, tokens


def _draws(entry: dict, source: LoadedSource) -> int:
    """Draws of `source` so far, from its cursor entry {"epoch", "position", "documents"}."""
    try:
        epoch, position, documents = (int(entry[k]) for k in ("epoch", "position", "documents"))
        weight = float(entry["weight"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"data cursor: source {source.key}: malformed ({err!r})") from None
    if not math.isclose(weight, source.weight, rel_tol=1e-9):
        # The current document and the draws ahead depend on the weights: a new mix, a new stage.
        raise CheckpointError(
            f"data cursor: source {source.key} had weight {weight:.6g}, now {source.weight:.6g}; "
            "a changed mix starts without a cursor"
        )
    if documents != source.documents:
        raise CheckpointError(f"data cursor: source {source.key} had {documents} documents, now "
                              f"{source.documents}: the dataset changed under the run")  # fmt: skip
    if not 0 <= position < documents or epoch < 0:
        raise CheckpointError(f"data cursor: position {position} is outside source {source.key}")
    return epoch * documents + position
