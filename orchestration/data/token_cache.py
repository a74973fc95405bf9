"""The loader's token cache: each prepared shard decoded once per machine into plain files that a
training loader reads by position (Megatron's indexed .bin/.idx idea, built lazily from Parquet).

Each shard is decoded once per machine into plain files named by its manifest sha256 (int32
tokens, int32 document lengths, int8 loss_mask, a json of its numbers) in `cache_dir` (default
$HANYEONG_LOADER_CACHE, else ~/.cache/hanyeong/loader, under XDG_CACHE_HOME when set), shared by
every loader there: every rank, stage, restart and teacher cache. An open then costs O(documents):
per shard a stat, its json and its lengths file; a shard whose size, mtime or inode changed since
its bytes were hashed is hashed again, and refused naming it when they are not the manifest's. The
cache costs 4 bytes a token (5 with a loss_mask) once per machine, is never evicted, and nothing in
it is deleted behind a loader's back: to clear it, delete the folder when no run is using it.

Why files and not the Parquet row groups: the loader draws a source's documents by a seeded
permutation of all of them, so consecutive documents lie in random row groups and a document would
cost its whole row group (TokenFile's docstring has the measurements).
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import itertools
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hanyeong.errors import DataError
from orchestration.data.manifest import read_manifest

# Documents per Arrow record batch when a shard is decoded into the cache, and the bytes read from
# the file at a time: what a build holds besides the lengths, whatever the shard's row-group size
# (shards.py writes a shard's table at once: one row group of up to 1Mi documents, tens of MB of
# tokens). Measured on an 8M-token row group: 1,024 documents a batch raise the peak RSS by 65 MB,
# 128 by 29.
READ_ROWS = 128
READ_BUFFER = 1 << 20
CACHE_FORMAT, CACHE_VERSION = "hanyeong-token-cache", 1
# A shard modified less than this before it was hashed is hashed again at the next open: file
# system timestamps are coarse (a tick of a few ms), so a rewrite inside the tick of the check could
# keep both size and mtime (git's "racily clean" files).
RACY_NS = 2_000_000_000


class TokenFile:
    """One column of a source (input_ids int32, or loss_mask int8): its shards' cache files back to
    back, read by position: `[a:b]` is one os.pread per shard file the values lie in (one: a
    document never spans shards).

    Why files and not the Parquet row groups: the order draws a source's documents by a seeded
    permutation of all of them, so consecutive documents lie in random row groups, and a document
    costs its whole row group (measured on the 2-core benchmark machine: 6.6 ms for a row group of
    0.8M tokens, 150 documents/s; 0.35 ms even for a row group of 16 documents), while the
    benchmark's mixture draws ~2,000 documents per million tokens.
    Why pread on open files and not np.memmap: about the same speed (measured on the 2-core
    benchmark machine, pieces of 50-2,000 tokens in the page cache: 6.6 us a piece by pread, 5.6 by
    memmap, both far above a training step's needs), but pages a memmap touched count in the
    process's RSS as it reads through the corpus. Either way an open file stays readable when its
    cache entry is replaced (a rebuild) or deleted while the loader runs.
    """

    def __init__(self, dtype, files: list, counts: list[int], low: int | None, high: int | None) -> None:
        self.dtype = np.dtype(dtype)
        self.files = files  # open binary files, one per shard: kept open for the loader's life
        self._fds = [f.fileno() for f in files]
        self._starts = [0, *itertools.accumulate(counts)]  # column index of each shard's first value
        self.size = self._starts[-1]
        self.low, self.high = low, high  # the smallest and largest value (the shards' recorded ones)
        self.bytes_read, self.reads = 0, 0

    def __len__(self) -> int:
        return self.size

    @property
    def shape(self) -> tuple[int]:
        return (self.size,)

    def __getitem__(self, key) -> np.ndarray:
        """Values [a:b] (step 1) as a read-only array, or one value."""
        if not isinstance(key, slice):
            i = int(key) + (self.size if int(key) < 0 else 0)
            if not 0 <= i < self.size:
                raise IndexError(f"index {key} is outside a column of {self.size} values")
            return self[i : i + 1][0]
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise IndexError("a TokenFile is read in runs of consecutive values (step 1)")
        if stop <= start:
            return np.zeros(0, self.dtype)
        starts = self._starts
        k = bisect.bisect_right(starts, start) - 1
        if stop <= starts[k + 1]:  # the loader's case, inlined: a document piece inside one shard
            width = self.dtype.itemsize
            data = os.pread(self._fds[k], (stop - start) * width, (start - starts[k]) * width)
            if len(data) == (stop - start) * width:
                self.reads, self.bytes_read = self.reads + 1, self.bytes_read + len(data)
                return np.frombuffer(data, self.dtype)
            return self._read(k, start, stop)  # ended early: _read says so
        pieces = []
        while start < stop:
            end = min(stop, self._starts[k + 1])
            pieces.append(self._read(k, start, end))
            start, k = end, k + 1
        return np.concatenate(pieces)

    def _read(self, k: int, start: int, stop: int) -> np.ndarray:
        width = self.dtype.itemsize
        count, at = stop - start, (start - self._starts[k]) * width
        data = os.pread(self._fds[k], count * width, at)
        if len(data) != count * width:
            raise DataError(f"{self.files[k].name}: the token cache file ended early ({len(data)} "
                            f"of {count * width} bytes)")  # fmt: skip
        self.reads, self.bytes_read = self.reads + 1, self.bytes_read + len(data)
        return np.frombuffer(data, self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every value, read now: for tools and tests; the loader reads slices."""
        return self[:].astype(dtype or self.dtype)

    def max(self) -> int:
        """The largest value, recorded when the shards were decoded (the vocabulary check reads no tokens)."""
        if self.high is None:
            raise ValueError("max of an empty column")
        return self.high

    def min(self) -> int:
        if self.low is None:
            raise ValueError("min of an empty column")
        return self.low

    def __repr__(self) -> str:
        return f"TokenFile({self.dtype}, {self.size} values, {len(self.files)} files)"


ENV_CACHE = "HANYEONG_LOADER_CACHE"  # a folder for the token cache instead of the default


def default_cache_dir() -> Path:
    """Where the token cache goes: $HANYEONG_LOADER_CACHE, else the hanyeong cache on local disk
    (XDG_CACHE_HOME honoured), not the temp folder, which is often a tmpfs (memory) on Linux; the
    temp folder only where the cache cannot be made."""
    from tokenizer.train import default_cache_dir as hanyeong_cache

    directory = Path(os.environ.get(ENV_CACHE) or hanyeong_cache() / "loader")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(tempfile.gettempdir()) / "hanyeong-loader"
    return directory


@dataclass
class ShardEntry:
    """One shard as a source reads it: its recorded numbers, its document lengths, its open files."""

    path: Path
    stats: dict = field(repr=False)
    """documents, tokens, low/high (token ids), first/last ([min, max] of the documents' first and
    last tokens), min_length, masked: what the tokenizer checks need, without reading tokens."""
    lengths: np.ndarray = field(repr=False)
    """int32 [documents]."""
    tokens: object = field(repr=False)
    """The open int32 token file."""
    mask: object = field(default=None, repr=False)
    """The open int8 loss_mask file; None when the shard has no loss_mask column."""


def open_source(directory: Path, name: str, tokenizer: dict, cache_dir: Path | None = None
                ) -> tuple[TokenFile, np.ndarray, TokenFile | None]:  # fmt: skip
    """A source's int32 tokens [N] (a TokenFile over its shards' cache files), document offsets
    int64 [docs + 1], and int8 loss_mask [N] (a second TokenFile) when the shards have that column
    (all of them or none), else None.

    Each shard comes from the token cache (see open_shard): built once per machine, after which an
    open reads only its lengths. Every open checks each shard's recorded numbers against the
    manifest and the tokenizer (ids inside the vocabulary, BOS ... EOS documents).
    """
    shards = read_manifest(directory)["sources"][name].get("shards", [])
    try:
        paths = [directory / shard["path"] for shard in shards]
        expected = [(int(shard["tokens"]), None if shard.get("documents") is None else int(shard["documents"]))
                    for shard in shards]  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{directory}/manifest.json: {name}: bad shard entry ({err!r})") from None
    for shard in shards:  # the cache's file names: never a path of its own, never a traceback
        if shard.get("sha256") and not re.fullmatch(r"[0-9a-f]{64}", str(shard["sha256"])):
            raise DataError(f"{directory}/manifest.json: {name}: shard {shard['path']}: sha256 must be 64 "
                            f"hex digits, got {shard['sha256']!r}")  # fmt: skip
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def check(i: int, entry: ShardEntry) -> None:
        path, (tokens, documents) = paths[i], expected[i]
        found = (entry.stats["documents"], entry.stats["tokens"])
        if found != (documents if documents is not None else found[0], tokens):
            raise DataError(f"{path}: {found[0]} documents, {found[1]} tokens; the manifest says "
                            f"{documents}, {tokens}")  # fmt: skip
        check_contract(entry, tokenizer)

    named = [(path, shard.get("sha256")) for path, shard in zip(paths, shards)]
    entries = open_shards(named, cache_dir, check)
    if len({e.stats["masked"] for e in entries}) > 1:
        raise DataError(f"{directory}: some shards have a loss_mask column and some do not")
    documents = sum(len(e.lengths) for e in entries)
    if not documents:
        raise DataError(f"{directory}: source {name!r}: no documents")
    offsets, at = np.zeros(documents + 1, np.int64), 0
    for e in entries:  # shard by shard, each one's lengths let go once summed: no second copy of all
        part = offsets[at + 1 : at + 1 + len(e.lengths)]
        np.cumsum(e.lengths, dtype=np.int64, out=part)
        part += offsets[at]
        at, e.lengths = at + len(part), None
    full = [e for e in entries if e.stats["tokens"]]
    counts = [e.stats["tokens"] for e in full]
    low, high = min(e.stats["low"] for e in full), max(e.stats["high"] for e in full)
    tokens = TokenFile(np.int32, [e.tokens for e in full], counts, low, high)
    masks = None
    if entries[0].stats["masked"]:
        masks = TokenFile(np.int8, [e.mask for e in full], counts, 0, 1)
    return tokens, offsets, masks


def check_contract(entry: ShardEntry, tokenizer: dict) -> None:
    """The shard contract from the shard's recorded numbers: documents of at least BOS, EOS, ids
    inside the vocabulary, every document BOS ... EOS."""
    s, where = entry.stats, entry.path
    if not s["documents"]:
        return
    if s["min_length"] < 2:
        raise DataError(f"{where}: a document has fewer than 2 tokens (BOS, EOS)")
    vocab, bos, eos = (tokenizer.get(k) for k in ("vocab_size", "bos_id", "eos_id"))
    if vocab is not None and (s["low"] < 0 or s["high"] >= vocab):
        raise DataError(f"{where}: token ids outside [0, {vocab})")
    if bos is not None and s["first"] != [bos, bos]:
        raise DataError(f"{where}: a document does not start with BOS ({bos})")
    if eos is not None and s["last"] != [eos, eos]:
        raise DataError(f"{where}: a document does not end with EOS ({eos})")


def open_shards(shards: list[tuple[Path, str | None]], cache_dir: Path, check) -> list[ShardEntry]:
    """open_shard for each (path, sha256), `check(i, entry)` as each opens. The ranks of a machine
    open the same shards at once: each starts at its own place in the list and first skips the
    shards another process is building, so that on a cold cache they build different shards side by
    side (then wait for the rest), never one shard eight times."""
    entries: list[ShardEntry | None] = [None] * len(shards)
    start = os.getpid() % max(len(shards), 1)
    order = [*range(start, len(shards)), *range(start)]
    with BuildLocks(cache_dir) as locks:
        for wait in (False, True):
            for i in order:
                if entries[i] is None:
                    entries[i] = open_shard(*shards[i], cache_dir, locks, wait)
                    if entries[i] is not None:
                        check(i, entries[i])
    return entries


class BuildLocks:
    """One POSIX record lock per shard sha256 (a byte of `<cache_dir>/.build.lock` picked by it):
    whoever holds it hashes and builds that entry; the lock goes with the process if it dies."""

    def __init__(self, cache_dir: Path) -> None:
        self.path, self.fd = cache_dir / ".build.lock", None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases every lock this process holds on the file

    def acquire(self, sha256: str, wait: bool) -> bool:
        import fcntl

        if self.fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise DataError(f"{self.path.parent}: cannot make the loader's token cache ({err})") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, self._byte(sha256))
        except BlockingIOError:
            return False
        return True

    def release(self, sha256: str) -> None:
        import fcntl

        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self._byte(sha256))

    @staticmethod
    def _byte(sha256: str) -> int:
        return int(sha256[:12], 16) if len(sha256) >= 12 else 0


def open_shard(path: Path, sha256: str | None, cache_dir: Path, locks: BuildLocks,
               wait: bool = True) -> ShardEntry | None:  # fmt: skip
    """A shard's cache entry, checked and open (None: `wait` is false and another process holds its
    build lock). THE TOKEN CACHE, per shard in `cache_dir`, named by the manifest's sha256 of the
    shard (so byte-identical shards of any dataset share one entry): `<sha256>.tokens.i32`,
    `<sha256>.lengths.i32`, `<sha256>.mask.i8` (shards with a loss_mask), and `<sha256>.json`,
    written last, so that its presence means the entry is whole.

    THE CHECKSUM LAW: `checked/<hash of the shard's path>.json` records the (size, mtime_ns, inode)
    the shard had when its bytes were last hashed against `sha256`. While the shard still shows
    those (and was not modified within RACY_NS of the hash), and the entry is whole (its files'
    sizes match its json), the open reads only the lengths; else the shard is hashed again (a
    mismatch is a DataError naming it) and the entry is built if it is missing or damaged.

    A shard without a sha256 (hand-made data) has no content to name an entry by: a path-and-mtime
    key could hand back stale tokens after a rewrite within one timestamp tick, so such a shard is
    decoded at every open into unlinked files instead, as before the cache.
    """
    try:
        stat = os.stat(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read the shard ({err})") from None
    if not sha256:
        return build_shard(path, None, cache_dir)
    entry = read_entry(cache_dir, sha256, path)
    if entry is not None and _still_checked(cache_dir, path, stat, sha256):
        return entry
    if not locks.acquire(sha256, wait):
        if entry is not None:  # another process is rebuilding it: this one comes back for it later
            for f in (entry.tokens, entry.mask):
                if f is not None:
                    f.close()
        return None
    try:
        entry = entry or read_entry(cache_dir, sha256, path)  # built meanwhile by the lock's holder?
        if entry is None or not _still_checked(cache_dir, path, stat, sha256):
            checked_ns = time.time_ns()
            check_sha256(path, sha256)
            if entry is None:
                entry = build_shard(path, sha256, cache_dir)
            stamp = {"path": str(path.resolve()), "sha256": sha256, "size": stat.st_size,
                     "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "checked_ns": checked_ns}  # fmt: skip
            _write_file(_stamp_path(cache_dir, path), json.dumps(stamp).encode())
    finally:
        locks.release(sha256)
    return entry


def _stamp_path(cache_dir: Path, path: Path) -> Path:
    name = hashlib.blake2b(str(path.resolve()).encode(), digest_size=16).hexdigest()
    return cache_dir / "checked" / f"{name}.json"


def _still_checked(cache_dir: Path, path: Path, stat: os.stat_result, sha256: str) -> bool:
    """Whether the shard is unchanged since its bytes were hashed against `sha256`."""
    try:
        stamp = json.loads(_stamp_path(cache_dir, path).read_text())
        seen = (stamp["path"], stamp["sha256"], stamp["size"], stamp["mtime_ns"], stamp["inode"])
        racy = stat.st_mtime_ns + RACY_NS > stamp["checked_ns"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    now = (str(path.resolve()), sha256, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return seen == now and not racy


def read_entry(cache_dir: Path, sha256: str, path: Path) -> ShardEntry | None:
    """The whole cache entry of `sha256`, its files open; None when it is missing or damaged (a
    json that does not parse, a file of another size than the json says): it is built again."""
    base = cache_dir / sha256
    files = []
    try:
        stats = json.loads(Path(f"{base}.json").read_text())
        made = (stats.get("format"), stats.get("version"), stats.get("sha256"))
        if made != (CACHE_FORMAT, CACHE_VERSION, sha256):
            return None
        documents, tokens = int(stats["documents"]), int(stats["tokens"])
        columns = [("tokens.i32", 4 * tokens), ("lengths.i32", 4 * documents)]
        columns += [("mask.i8", tokens)] if stats["masked"] else []
        for column, size in columns:
            files.append(open(f"{base}.{column}", "rb", buffering=0))  # noqa: SIM115  (held open while the loader lives)
            if os.fstat(files[-1].fileno()).st_size != size:
                raise ValueError(f"{column}: not {size} bytes")
        lengths = np.fromfile(files[1], np.int32, count=documents)
        if len(lengths) != documents or int(lengths.sum(dtype=np.int64)) != tokens:
            raise ValueError("lengths do not add up")
    except (OSError, ValueError, KeyError, TypeError) as err:
        for f in files:
            f.close()
        if getattr(err, "errno", None) == errno.EMFILE:  # not damage: the process's open-file limit
            raise DataError(f"{path}: too many open files ({err}); a loader keeps each shard's cache "
                            "files open: raise the limit (ulimit -n)") from None  # fmt: skip
        return None
    files[1].close()
    return ShardEntry(path, stats, lengths, files[0], files[2] if stats["masked"] else None)


def build_shard(path: Path, sha256: str | None, cache_dir: Path) -> ShardEntry:
    """Decode a shard READ_ROWS documents at a time into its cache entry (temporary names in
    `cache_dir`, fsynced, renamed into place, the json last), or, without a sha256, into unlinked
    files. Structure is checked on the way (list<int32> ids, a loss_mask lined up with them);
    the tokenizer's checks are check_contract's, from the recorded numbers."""
    import pyarrow as pa

    masked = _has_loss_mask(path)
    columns = ["tokens.i32", "lengths.i32"] + (["mask.i8"] if masked else [])
    files, lengths = {}, []
    stats = {"documents": 0, "tokens": 0, "low": None, "high": None, "first": None, "last": None,
             "min_length": None, "masked": masked}  # fmt: skip
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for column in columns:
            files[column] = (tempfile.NamedTemporaryFile(dir=cache_dir, prefix=f".{sha256}.{column}.",  # noqa: SIM115
                                                         suffix=".tmp", delete=False)
                             if sha256 else tempfile.TemporaryFile(dir=cache_dir))  # noqa: SIM115  # fmt: skip
        for bounds, values, mask in read_shard(path, masked):
            files["tokens.i32"].write(memoryview(np.ascontiguousarray(values, np.int32)).cast("B"))
            if masked:
                files["mask.i8"].write(memoryview(np.ascontiguousarray(mask, np.int8)).cast("B"))
            lengths.append(np.diff(bounds).astype(np.int32))
            _record(stats, values, bounds)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        files["lengths.i32"].write(memoryview(lengths).cast("B"))
        for f in files.values():
            f.flush()
        if sha256:
            _publish(path, sha256, cache_dir, files, stats)
    except OSError as err:  # a full disk: say where the token cache goes
        for f in files.values():
            f.close()
        raise DataError(f"{cache_dir}: cannot write the loader's token cache ({err}); free space "
                        "there or pass another cache_dir") from None  # fmt: skip
    except BaseException:  # a bad shard, Ctrl-C: an unlinked file of a shard without sha256 is closed too
        for f in files.values():
            f.close()
        raise
    finally:
        if sha256:
            for f in files.values():
                f.close()
                Path(f.name).unlink(missing_ok=True)  # gone already when it was renamed into place
        pa.default_memory_pool().release_unused()  # the read batches' buffers, else kept around
    if sha256:
        entry = read_entry(cache_dir, sha256, path)
        if entry is None:
            raise DataError(f"{cache_dir}: the token cache entry {sha256} was damaged as it was written")
        return entry
    files["lengths.i32"].close()
    return ShardEntry(path, stats, lengths, files["tokens.i32"], files.get("mask.i8"))


def _record(stats: dict, values: np.ndarray, bounds: np.ndarray) -> None:
    """Add one read batch to a shard's recorded numbers (see ShardEntry.stats)."""
    sizes = np.diff(bounds)
    stats["documents"] += len(sizes)
    stats["tokens"] += len(values)
    if len(sizes):
        stats["min_length"] = _fold(stats["min_length"], int(sizes.min()), min)
    if len(values):
        stats["low"] = _fold(stats["low"], int(values.min()), min)
        stats["high"] = _fold(stats["high"], int(values.max()), max)
        full = sizes > 0  # an empty document has no first token (check_contract refuses it anyway)
        for name, at in (("first", bounds[:-1][full]), ("last", bounds[1:][full] - 1)):
            if len(at):
                ends, seen = values[at], stats[name]
                low, high = int(ends.min()), int(ends.max())
                stats[name] = [low, high] if seen is None else [min(seen[0], low), max(seen[1], high)]


def _fold(old, new, pick):
    return new if old is None else pick(old, new)


def _publish(path: Path, sha256: str, cache_dir: Path, files: dict, stats: dict) -> None:
    """Rename a built entry's files into place, fsynced, the json last."""
    from hanyeong.files import umask

    for column, f in files.items():
        os.fchmod(f.fileno(), 0o666 & ~umask())  # as any file (temporary files are 0600): shared
        os.fsync(f.fileno())
        os.replace(f.name, cache_dir / f"{sha256}.{column}")
    stat = os.stat(path)
    built_from = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "sha256": sha256, **stats,
              "built_from": built_from}  # fmt: skip
    _write_file(cache_dir / f"{sha256}.json", json.dumps(record, indent=1).encode())
    try:  # the renames themselves, on disk
        fd = os.open(cache_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # a file system that cannot fsync a folder: the renames land in its own time


def _write_file(path: Path, data: bytes) -> None:
    """Crash-safe: a temporary name in the same folder, fsync, os.replace."""
    from hanyeong.files import umask

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_sha256(path: Path, sha256: str | None) -> None:
    """The shard's bytes against the manifest's sha256, hashed in 1 MiB blocks (shards.file_sha256)."""
    from orchestration.data.shards import file_sha256

    if not sha256:
        return  # a manifest without checksums (hand-made test data)
    try:
        found = file_sha256(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read the shard ({err})") from None
    if found != sha256:
        raise DataError(f"{path}: its sha256 is not the manifest's: the shard changed or was damaged "
                        "after preparation; prepare the dataset again")  # fmt: skip


def read_shard(path: Path, masked: bool):
    """Yield (offsets int64 [rows + 1] from 0, input_ids values int32, loss_mask values int8 or None)
    per read batch of at most READ_ROWS documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["input_ids", "loss_mask"] if masked else ["input_ids"]
    try:
        with pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False) as parquet:  # closed on any exit
            for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=columns, use_threads=False):
                column = batch.column("input_ids")
                if column.null_count or str(getattr(column.type, "value_type", "")) != "int32":
                    raise DataError(f"{path}: input_ids must be list<int32>, no nulls; got {column.type}")
                bounds = column.offsets.to_numpy().astype(np.int64)
                values = column.values.to_numpy(zero_copy_only=True)[bounds[0] : bounds[-1]]
                mask = read_loss_mask(batch.column("loss_mask"), bounds, path) if masked else None
                yield bounds - bounds[0], values, mask
    except (OSError, KeyError, ValueError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read the input_ids column ({err})") from None


def _has_loss_mask(path: Path) -> bool:
    """Whether a shard carries a loss_mask column (its schema: the file's footer only)."""
    import pyarrow.parquet as pq

    try:
        return "loss_mask" in pq.read_schema(path).names
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the shard ({err})") from None


def read_loss_mask(column, bounds: np.ndarray, path: Path) -> np.ndarray:
    """The int8 values of a list<int8> loss_mask column of one read batch, checked to line up with
    the input_ids rows whose offsets are `bounds`."""
    if column.null_count or str(getattr(column.type, "value_type", "")) != "int8":
        raise DataError(f"{path}: loss_mask must be list<int8>, no nulls; got {column.type}")
    mask_bounds = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)[mask_bounds[0] : mask_bounds[-1]]
    if len(values) > bounds[-1] - bounds[0]:
        raise DataError(f"{path}: loss_mask has more values than input_ids")
    if not np.array_equal(np.diff(bounds), np.diff(mask_bounds)):
        raise DataError(f"{path}: loss_mask rows differ in length from input_ids rows")
    if len(values) and (values.min() < 0 or values.max() > 1):
        raise DataError(f"{path}: loss_mask values must be 0 or 1")
    return values
