"""The streaming loader (issue #20): a rank's rows of the global batch and only their tokens, the
cursor of the whole global batch, memory O(documents) and never O(tokens), shards hashed and read
in blocks; and the token cache: built once per shard, shared, never trusted when damaged, never
trusted for a shard that changed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

import orchestration.data.loader as loader_module
import orchestration.data.token_cache as token_cache
from hanyeong.errors import ConfigError, DataError
from orchestration.core.parallel import rank_rows
from tests.orchestration.data.test_loader import (  # noqa: F401  (datasets: the shared fixture)
    BOS,
    EOS,
    FAST,
    PAD,
    VOCAB,
    assert_same,
    datasets,
    loader,
    loader_cache,
    make_docs,
    mixtures,
    read,
    rows_of,
    schedules,
    write_dataset,
    write_masked,
)


@pytest.fixture(scope="module")
def with_chat(datasets):
    """The shared datasets plus a masked chat dataset ('sft') under the same root."""
    root, _ = datasets
    rng = np.random.default_rng(9)
    chat = [[BOS, *rng.integers(3, 2000, rng.integers(1, 40)).tolist(), EOS] for _ in range(30)]
    if not (root / "sft").exists():
        write_masked(root / "sft", chat, shards=2)
    return root


def local_batches(root: Path, config: dict, seed: int, schedule, world: int, state=None) -> list:
    """Per rank, the batches of a loader that keeps rank's rows (rows_of), and the ranks' cursors."""
    out = []
    for rank in range(world):
        data = loader(root, config, seed, rows_of=(rank, world), state=state)
        out.append((read(data, schedule), data.state()))
    return out


@FAST
@given(config=mixtures(), chat=st.booleans(), seed=st.integers(0, 2**40), schedule=schedules,
       world=st.integers(1, 5))  # fmt: skip
def test_rows_of_returns_exactly_what_rank_rows_keeps(with_chat, config, chat, seed, schedule, world):
    """Each rank's batch is rank_rows(global batch) (also ranks given no row), and every rank's
    cursor is the global loader's, so 2 workers read what 1 does and resume alike."""
    if chat:  # a masked source: loss_mask rows follow
        config = {**config, "sources": [*config["sources"], {"dataset": "sft", "weight": 2.0}]}
    whole = loader(with_chat, config, seed)
    expected = read(whole, schedule)
    for rank, (batches, state) in enumerate(local_batches(with_chat, config, seed, schedule, world)):
        assert_same(batches, [rank_rows(b, rank, world) for b in expected])
        assert state == whole.state()


@FAST
@given(config=mixtures(), seed=st.integers(0, 2**40), before=schedules, after=schedules,
       world=st.integers(2, 4))  # fmt: skip
def test_a_rank_resumes_exactly_from_any_cursor(with_chat, config, seed, before, after, world):
    """The cursor of a rank's loader is the global one: resuming a rank at it (or at a single
    worker's cursor) gives that rank's rows of exactly the next global batches."""
    whole = loader(with_chat, config, seed)
    read(whole, before)
    cursor = json.loads(json.dumps(whole.state()))
    expected = read(whole, after)
    for rank, (batches, state) in enumerate(local_batches(with_chat, config, seed, after, world, cursor)):
        assert_same(batches, [rank_rows(b, rank, world) for b in expected])
        assert state == whole.state()


@pytest.mark.parametrize("split", [True, False])
def test_a_rank_reads_only_the_tokens_of_its_rows(with_chat, split):
    """The I/O law: during next_batch a rank reads exactly the tokens (and loss_mask values) of its
    own rows, never another rank's; over the ranks, what a single worker reads."""
    config = {"sources": [{"dataset": "stage2"}, {"dataset": "sft"}], "split_documents": split}

    def read_bytes(data):
        return sum(s.tokens.bytes_read + (s.masks.bytes_read if s.masks is not None else 0) for s in data.sources)

    whole = loader(with_chat, config, seed=3, seq_len=40, rows=5)
    start = read_bytes(whole)
    assert start == 0  # opening reads no token: the cache's lengths files only
    batches = read(whole, [(40, 5)] * 6)
    total = 0
    for rank in range(3):
        data = loader(with_chat, config, seed=3, seq_len=40, rows=5, rows_of=(rank, 3))
        before = read_bytes(data)
        assert before == 0
        mine = read(data, [(40, 5)] * 6)
        tokens = sum(int((rows_of(b) != PAD).sum()) for b in mine)
        (sft,) = [s for s in data.sources if s.masks is not None]
        assert read_bytes(data) - before == 4 * tokens + sft.masks.bytes_read  # 4 bytes a token
        assert 4 * sft.masks.bytes_read == sft.tokens.bytes_read  # each chat piece: its mask values
        total += read_bytes(data) - before
    assert total == read_bytes(whole) - start and sum(int((rows_of(b) != PAD).sum()) for b in batches) > 0


def retained_array_bytes(data) -> int:
    """Bytes of every numpy array the loader and its sources keep (lists and dicts of them too)."""
    seen, total = set(), 0
    stack = [vars(data), *(vars(s) for s in data.sources)]
    while stack:
        item = stack.pop()
        values = item.values() if isinstance(item, dict) else item
        for value in values:
            if isinstance(value, np.ndarray) and id(value) not in seen:
                seen.add(id(value))
                base = value if value.base is None else value.base
                if isinstance(base, np.ndarray) and id(base) not in seen:
                    seen.add(id(base))
                    total += base.nbytes
                elif base is value:
                    total += value.nbytes
            elif isinstance(value, (list, tuple, dict)):
                stack.append(value)
    return total


def test_the_loader_keeps_offsets_never_tokens(tmp_path):
    """The memory law: what stays in memory is O(documents) (int64 offsets and the epoch's int32
    permutation, 12 bytes a document, and one draw block), not the source's tokens, however long its
    documents."""
    rng, tags = np.random.default_rng(1), iter(range(3000, 4000))
    docs = make_docs(rng, 60, 3000, 5000, tags)  # ~240k tokens: ~1 MB as int32
    write_dataset(tmp_path / "d", {"web": docs}, shards=3)
    data = loader(tmp_path, {"sources": [{"dataset": "d"}]}, seq_len=512, rows=4)
    read(data, [(512, 4)] * 20)
    tokens = sum(map(len, docs))
    assert retained_array_bytes(data) <= 12 * len(docs) + 8 + 16 * loader_module.DRAW_BLOCK
    assert retained_array_bytes(data) < tokens  # a quarter of the tokens' int32 bytes, at most


def test_a_source_keeps_one_epochs_permutation_and_shuffles_each_epoch_once(tmp_path, monkeypatch):
    """The memory law's permutation: a draw block of small sources spans many epochs (here about
    ten), and each source keeps one epoch's permutation, the last its laid-out draws reach; dropping
    it early would cost a second shuffle of that epoch in the next block."""
    shuffled = []

    def counted(seed, key, epoch, n):
        shuffled.append((key, epoch))
        return real(seed, key, epoch, n)

    real = loader_module.permutation
    monkeypatch.setattr(loader_module, "permutation", counted)
    write_dataset(tmp_path / "d", {"one": [[BOS, 5, EOS]] * 50, "two": [[BOS, 6, EOS]] * 30})
    data = loader(tmp_path, {"sources": [{"dataset": "d"}]}, seq_len=511, rows=8)
    for _ in range(4):  # 1,365 documents a batch: every batch starts a draw block
        held = [s for s, _ in data._permutations]  # (source, epoch) -> int32 permutation
        assert sorted(held) == sorted(set(held)) and len(held) <= len(data.sources)
        data.next_batch()
    assert len(shuffled) == len(set(shuffled)) and len(shuffled) > 100


@given(st.lists(st.lists(st.integers(0, 40), max_size=5), min_size=1, max_size=10), st.data())
def test_a_shards_recorded_numbers_do_not_depend_on_its_read_batches(docs, data):
    """The numbers check_contract reads (count, sizes, smallest and largest id, first and last
    tokens' ranges) folded over any batching of the documents equal those of all at once."""
    cuts = sorted(data.draw(st.sets(st.integers(1, len(docs) - 1))) if len(docs) > 1 else ())

    def recorded(groups):
        stats = {"documents": 0, "tokens": 0, "low": None, "high": None, "first": None, "last": None,
                 "min_length": None}  # fmt: skip
        for group in groups:
            bounds = np.concatenate([[0], np.cumsum([len(d) for d in group])]).astype(np.int64)
            token_cache._record(stats, np.array([t for d in group for t in d], np.int32), bounds)
        return stats

    def span(values):
        return [min(values), max(values)] if values else None

    ids, full = [t for d in docs for t in d], [d for d in docs if d]
    assert recorded([docs[a:b] for a, b in zip([0, *cuts], [*cuts, len(docs)])]) == {
        "documents": len(docs), "tokens": len(ids), "low": min(ids, default=None), "high": max(ids, default=None),
        "first": span([d[0] for d in full]), "last": span([d[-1] for d in full]),
        "min_length": min(map(len, docs))}  # fmt: skip


def test_a_shard_is_hashed_and_decoded_in_blocks_never_whole(tmp_path, monkeypatch):
    """Opening reads each shard in blocks: never its bytes whole, never a whole table, and Arrow
    batches of at most READ_ROWS documents, even inside one large row group."""
    rng, tags = np.random.default_rng(2), iter(range(3000, 4000))
    docs = make_docs(rng, 50, 3, 40, tags)
    (tmp_path / "d" / "shards" / "web").mkdir(parents=True)
    write_dataset(tmp_path / "d", {"web": docs})
    path = tmp_path / "d" / "shards" / "web" / "part-00000.parquet"
    pq.write_table(pq.read_table(path), path, row_group_size=50)  # one row group
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    manifest["sources"]["web"]["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    expected = loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "first").sources[0]
    sizes = []
    real = token_cache.read_shard

    def counted(path, masked):
        for bounds, values, mask in real(path, masked):
            sizes.append(len(bounds) - 1)
            yield bounds, values, mask

    def refuse(*args, **kwargs):
        raise AssertionError("a shard was read whole")

    monkeypatch.setattr(token_cache, "READ_ROWS", 8)
    monkeypatch.setattr(token_cache, "read_shard", counted)
    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    (source,) = loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "second").sources
    assert max(sizes) == 8 and sum(sizes) == 50  # 7 batches: each row group read once, in blocks
    assert np.array_equal(source.offsets, expected.offsets)
    assert np.array_equal(np.asarray(source.tokens), np.asarray(expected.tokens))


def test_a_replaced_shard_is_refused_naming_it(tmp_path):
    """A shard that still parses, with the manifest's counts, but other bytes: one DataError line
    naming that shard."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS]] * 6}, shards=2)
    path = tmp_path / "d" / "shards" / "web" / "part-00001.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([[BOS, 7, 8, EOS]] * 3, pa.list_(pa.int32()))}), path)
    with pytest.raises(DataError, match=r"part-00001.parquet: its sha256 is not the manifest's") as err:
        loader(tmp_path, {"sources": [{"dataset": "d"}]})
    assert "\n" not in str(err.value) and "part-00000" not in str(err.value)
    path.unlink()
    with pytest.raises(DataError, match=r"part-00001.parquet: cannot read the shard"):
        loader(tmp_path, {"sources": [{"dataset": "d"}]})


def test_shards_without_a_checksum_leave_nothing_on_disk(tmp_path):
    """A hand-made shard (no sha256 in its manifest) has no content to name a cache entry by: it is
    decoded into unlinked files, and the cache folder stays empty."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS]] * 6}, shards=2)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    for shard in manifest["sources"]["web"]["shards"]:
        shard["sha256"] = None
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    data = loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache")
    read(data, [(8, 2)] * 3)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("value", [(2, 2), (0, 0), (-1, 2), (0.0, 1), "0/2", (True, 2), (0, 1, 2)])
def test_bad_rows_of_is_one_config_error(datasets, value):
    with pytest.raises(ConfigError, match=r"^rows_of must be \(rank, world\) with 0 <= rank < world, got "):
        loader(datasets[0], {"sources": [{"dataset": "stage2"}]}, rows_of=value)


def test_rows_of_may_change_between_batches(datasets):
    """The stage sets rows_of once the group is known; the cursor does not depend on it."""
    root, _ = datasets
    config = {"sources": [{"dataset": "stage2"}]}
    whole, part = loader(root, config, seed=5, rows=4), loader(root, config, seed=5, rows=4)
    expected = read(whole, [(24, 4)] * 4)
    got = read(part, [(24, 4)] * 2)
    part.rows_of = [1, 2]  # a list (from a config) is kept as a tuple
    assert (whole.rows_of, part.rows_of) == (None, (1, 2))
    got += read(part, [(24, 4)] * 2)
    assert_same(got[:2], expected[:2])
    assert_same(got[2:], [rank_rows(b, 1, 2) for b in expected[2:]])
    assert part.state() == whole.state()


# ---- the token cache ------------------------------------------------------------------------------


def age(directory: Path, seconds: int = 60) -> None:
    """Date every shard under `directory` `seconds` back: past the racy window (RACY_NS), in which a
    freshly written shard is hashed again at every open."""
    for path in directory.rglob("*.parquet"):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - seconds * 10**9))


def mixed(root: Path) -> dict:
    """A chat dataset (loss_mask, 2 shards) and a web dataset (3 shards) under `root`: the mixture."""
    rng, tags = np.random.default_rng(11), iter(range(3000, 4000))
    chat = [[BOS, *rng.integers(3, 2000, rng.integers(1, 30)).tolist(), EOS] for _ in range(20)]
    write_masked(root / "sft", chat, shards=2)
    write_dataset(root / "web", {"web": make_docs(rng, 30, 3, 50, tags)}, shards=3)
    return {"sources": [{"dataset": "sft"}, {"dataset": "web", "weight": 2.0}]}


class Reads:
    """Counts what an open reads of the shards: Parquet footers and files, and whole-file hashes."""

    def __init__(self, monkeypatch) -> None:
        import orchestration.data.shards as shards

        self.parquet = self.hashed = 0
        real_file, real_schema, real_hash = pq.ParquetFile, pq.read_schema, shards.file_sha256

        def parquet_file(*args, **kwargs):
            self.parquet += 1
            return real_file(*args, **kwargs)

        def read_schema(*args, **kwargs):
            self.parquet += 1
            return real_schema(*args, **kwargs)

        def file_sha256(path):
            self.hashed += 1
            return real_hash(path)

        monkeypatch.setattr(pq, "ParquetFile", parquet_file)
        monkeypatch.setattr(pq, "read_schema", read_schema)
        monkeypatch.setattr(shards, "file_sha256", file_sha256)


def entries(cache: Path) -> set[str]:
    """The shard sha256s with a whole-looking entry in `cache`."""
    return {p.name.split(".")[0] for p in cache.glob("*.json")}


def test_a_second_loader_reads_no_parquet_and_yields_the_same_batches(tmp_path, monkeypatch):
    """Law 1: the first open builds one entry per shard; a second loader (another rank, stage or
    restart) reads no Parquet and hashes nothing at open, and yields identical batches."""
    config, cache, schedule = mixed(tmp_path), tmp_path / "cache", [(24, 3)] * 6
    age(tmp_path)
    reads = Reads(monkeypatch)
    first = loader(tmp_path, config, seed=7, seq_len=24, rows=3, cache_dir=cache)
    assert reads.parquet > 0 and reads.hashed == 5 and len(entries(cache)) == 5
    expected = read(first, schedule)
    reads.parquet = reads.hashed = 0
    second = loader(tmp_path, config, seed=7, seq_len=24, rows=3, cache_dir=cache)
    assert (reads.parquet, reads.hashed) == (0, 0)
    assert_same(read(second, schedule), expected)
    assert not list(cache.glob("*.tmp"))  # no temporary file left behind


def test_a_fresh_shard_is_hashed_again_but_not_decoded(tmp_path, monkeypatch):
    """A shard written within RACY_NS of its hash could change within one timestamp tick unseen, so
    the next open hashes it again; its entry is still whole, so nothing is decoded."""
    config, cache = mixed(tmp_path), tmp_path / "cache"
    expected = read(loader(tmp_path, config, cache_dir=cache), [(16, 2)] * 4)
    reads = Reads(monkeypatch)
    data = loader(tmp_path, config, cache_dir=cache)
    assert (reads.parquet, reads.hashed) == (0, 5)
    assert_same(read(data, [(16, 2)] * 4), expected)


def test_byte_identical_shards_of_two_datasets_share_one_entry(tmp_path, monkeypatch):
    """Law 2: the cache is named by content: a copied dataset's shards are hashed (their files are
    new to the cache) but not decoded again, and its source reads the same tokens."""
    config, cache = mixed(tmp_path / "a"), tmp_path / "cache"
    age(tmp_path / "a")
    loader(tmp_path / "a", config, cache_dir=cache)
    shutil.copytree(tmp_path / "a" / "web", tmp_path / "copy")
    reads = Reads(monkeypatch)
    both = {"sources": [{"dataset": "a/web"}, {"dataset": "copy"}]}
    data = loader(tmp_path, both, cache_dir=cache)
    assert reads.parquet == 0 and reads.hashed == 3 and len(entries(cache)) == 5
    a, b = data.sources
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert np.array_equal(a.offsets, b.offsets)


@pytest.mark.parametrize("how", ["in place", "renamed over, mtime kept"])
def test_a_shard_damaged_after_its_entry_was_built_is_refused_naming_it(tmp_path, how):
    """Law 3, the checksum law with a whole cache entry for the shard's original bytes: a shard
    whose bytes changed (its size, mtime or inode with them) is hashed again and refused, one
    DataError line naming it; the entry of the original bytes is left as it is."""
    config, cache = mixed(tmp_path), tmp_path / "cache"
    age(tmp_path)
    loader(tmp_path, config, cache_dir=cache)
    path = tmp_path / "web" / "shards" / "web" / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    if how == "in place":
        path.write_bytes(bytes(data))
    else:
        stat = path.stat()
        other = path.with_suffix(".new")
        other.write_bytes(bytes(data))
        os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(other, path)
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    for _ in range(2):  # and again: a refused shard is never marked checked
        with pytest.raises(DataError, match=r"part-00001.parquet: its sha256 is not the manifest's") as err:
            loader(tmp_path, config, cache_dir=cache)
        assert "\n" not in str(err.value) and "part-00000" not in str(err.value)
    assert len(entries(cache)) == 5


def rewrite(path: Path, data: bytes) -> None:
    """Replace a file by a new one (a new inode: a loader holding the old one open keeps it)."""
    path.with_suffix(".new").write_bytes(data)
    os.replace(path.with_suffix(".new"), path)


def damage(cache: Path) -> None:
    """Five entries damaged five ways: a truncated token file, a json that does not parse, a
    lengths file gone, a mask file of the wrong size, lengths of the right count that do not add
    up to the tokens."""
    jsons = sorted(cache.glob("*.json"))
    masked = [p for p in jsons if json.loads(p.read_text())["masked"]]
    plain = [p for p in jsons if p not in masked]
    tokens = plain[0].with_name(plain[0].name.replace(".json", ".tokens.i32"))
    rewrite(tokens, tokens.read_bytes()[:-4])
    rewrite(plain[1], b"{not json")
    plain[2].with_name(plain[2].name.replace(".json", ".lengths.i32")).unlink()
    mask = masked[0].with_name(masked[0].name.replace(".json", ".mask.i8"))
    rewrite(mask, mask.read_bytes() + b"\x01")
    lengths = masked[1].with_name(masked[1].name.replace(".json", ".lengths.i32"))
    values = np.fromfile(lengths, np.int32)
    values[0] += 1
    rewrite(lengths, values.tobytes())


def test_a_damaged_cache_entry_is_rebuilt_and_the_batches_are_unchanged(tmp_path, monkeypatch):
    """Law 4: an entry whose files disagree with its json (or without a json that parses) is never
    trusted: it is built again, and the batches are those of the whole cache. A loader already
    running keeps reading its open files while another one rebuilds."""
    config, cache, schedule = mixed(tmp_path), tmp_path / "cache", [(20, 3)] * 6
    age(tmp_path)
    running = loader(tmp_path, config, seed=2, seq_len=20, rows=3, cache_dir=cache)
    expected = read(loader(tmp_path, config, seed=2, seq_len=20, rows=3, cache_dir=cache), schedule)
    damage(cache)
    sizes = {p.name: p.stat().st_size for p in cache.glob("*.*")}
    reads = Reads(monkeypatch)
    again = loader(tmp_path, config, seed=2, seq_len=20, rows=3, cache_dir=cache)
    assert reads.hashed == 5 and reads.parquet > 0  # the five damaged entries, and only them
    assert_same(read(again, schedule), expected)
    for p in cache.glob("*.json"):
        stats, sha = json.loads(p.read_text()), p.name.split(".")[0]
        assert (cache / f"{sha}.tokens.i32").stat().st_size == 4 * stats["tokens"]
        assert (cache / f"{sha}.lengths.i32").stat().st_size == 4 * stats["documents"]
    assert len(sizes) < len(list(cache.glob("*.*")))  # the lengths file is back
    reads.parquet = reads.hashed = 0
    last = loader(tmp_path, config, seed=2, seq_len=20, rows=3, cache_dir=cache)
    assert_same(read(last, schedule), expected)
    assert (reads.parquet, reads.hashed) == (0, 0)
    assert_same(read(running, schedule), expected)


def test_a_shard_refused_while_it_is_decoded_leaves_no_entry(tmp_path):
    """A shard that fails its structural checks half way leaves neither an entry nor temporary
    files: the next open decodes it again and refuses it again."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, EOS]] * 4})
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    shard = manifest["sources"]["web"]["shards"][0]
    path = tmp_path / "d" / shard["path"]
    pq.write_table(pa.table({"input_ids": pa.array([[BOS, 5, EOS]] * 4, pa.list_(pa.int64()))}), path)
    shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    for _ in range(2):
        with pytest.raises(DataError, match="input_ids must be list<int32>"):
            loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache")
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [".build.lock"]  # the build lock only


def test_the_tokenizer_checks_hold_on_a_cache_hit(tmp_path):
    """The vocabulary and BOS/EOS checks come from each entry's recorded numbers, so a dataset
    whose manifest claims another tokenizer is refused also when its shards' entries exist."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 4000, EOS]] * 4})
    loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache")
    for key, value, message in [("vocab_size", 4000, r"token ids outside \[0, 4000\)"),
                                ("bos_id", 7, r"a document does not start with BOS \(7\)"),
                                ("eos_id", 7, r"a document does not end with EOS \(7\)")]:  # fmt: skip
        manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
        manifest["tokenizer"] = {"vocab_size": VOCAB, "bos_id": BOS, "eos_id": EOS, key: value}
        (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DataError, match=rf"part-00000.parquet: {message}"):
            loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache")


def test_a_token_file_reads_across_shards_exactly_its_bytes(tmp_path):
    """A source's TokenFile is its shards' files back to back: any [a:b] equals the concatenated
    tokens, one pread per shard it spans; max() and min() come from the recorded numbers."""
    rng, tags = np.random.default_rng(5), iter(range(3000, 4000))
    docs = make_docs(rng, 12, 3, 9, tags)
    write_dataset(tmp_path / "d", {"web": docs}, shards=4)
    (source,) = loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache").sources
    flat = np.concatenate([np.array(d, np.int32) for d in docs])
    assert len(source.tokens.files) == 4 and (source.tokens.reads, source.tokens.bytes_read) == (0, 0)
    assert (source.tokens.max(), source.tokens.min()) == (flat.max(), flat.min())
    ends = np.cumsum([sum(map(len, docs[i : i + 3])) for i in range(0, 12, 3)])  # 3 documents a shard
    for a, b in [(0, len(flat)), (3, 40), (len(flat) - 2, len(flat)), (5, 5), (ends[0] - 1, ends[1] + 1)]:
        before, reads = source.tokens.bytes_read, source.tokens.reads
        assert np.array_equal(source.tokens[a:b], flat[a:b])
        spanned = len({int(np.searchsorted(ends, i, side="right")) for i in range(a, b)})
        assert (source.tokens.bytes_read - before, source.tokens.reads - reads) == (4 * (b - a), spanned)
    assert source.tokens[-1] == EOS and source.tokens[0] == BOS
    assert source.tokens.shape == (len(flat),) and np.asarray(source.tokens).dtype == np.int32
    assert repr(source.tokens) == f"TokenFile(int32, {len(flat)} values, 4 files)"
    for outside in (len(flat), -len(flat) - 1):
        with pytest.raises(IndexError, match=f"^index {outside} is outside a column of {len(flat)} values"):
            source.tokens[outside]


def test_a_cache_file_cut_short_while_open_is_one_data_error_naming_it(tmp_path):
    """A read that gets fewer bytes than it asked (the file was truncated under the open loader) is
    refused naming the file, inside one shard's file (the inlined read) and across two."""
    rng, tags = np.random.default_rng(6), iter(range(4000, 5000))
    write_dataset(tmp_path / "d", {"web": make_docs(rng, 6, 3, 9, tags)}, shards=2)
    (source,) = loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache").sources
    first = source.tokens.files[0].name
    os.truncate(first, 2 * source.tokens.dtype.itemsize)  # two values left
    for a, b in [(1, 4), (0, len(source.tokens))]:
        with pytest.raises(DataError, match=f"^{re.escape(first)}: the token cache file ended early"):
            source.tokens[a:b]


def recorded_opens(monkeypatch, owner, name: str, make) -> list:
    """Every file `owner.name` (replaced by a recorder around `make`) opens, in order."""
    opened = []

    def recorded(*args, **kwargs):
        opened.append(make(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(owner, name, recorded, raising=False)
    return opened


@pytest.fixture
def unlinked_files(monkeypatch) -> list:
    """The unlinked files a shard without sha256 is decoded into, as build_shard opens them."""
    return recorded_opens(monkeypatch, token_cache.tempfile, "TemporaryFile", tempfile.TemporaryFile)


def test_a_shard_without_sha256_keeps_only_its_token_file_open(tmp_path, unlinked_files):
    """The tokens are read by position for the loader's life; the lengths were read into memory."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS]] * 6})
    (shard,) = (tmp_path / "d").rglob("*.parquet")
    entry = token_cache.build_shard(shard, None, tmp_path / "cache")
    assert [f.closed for f in unlinked_files] == [False, True] and entry.tokens is unlinked_files[0]
    entry.tokens.close()


def test_a_masked_shard_without_sha256_keeps_its_mask(tmp_path, unlinked_files):
    write_masked(tmp_path / "d", [[BOS, 5, 6, EOS], [BOS, 7, EOS]], [[0, 0, 1, 1], [0, 1, 1]])
    (shard,) = (tmp_path / "d").rglob("*.parquet")
    entry = token_cache.build_shard(shard, None, tmp_path / "cache")
    assert entry.mask is unlinked_files[2] and os.pread(entry.mask.fileno(), 64, 0) == bytes([0, 0, 1, 1, 0, 1, 1])
    entry.tokens.close(), entry.mask.close()


def test_a_cache_file_that_fails_to_land_leaves_no_temporary_file(tmp_path, monkeypatch):
    def refused(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(token_cache.os, "replace", refused)
    with pytest.raises(OSError, match="No space left"):
        token_cache._write_file(tmp_path / "checked" / "x.json", b"{}")
    assert list((tmp_path / "checked").iterdir()) == []


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ValueError("a bad row")],
                         ids=["disk-full", "bad-shard"])  # fmt: skip
def test_a_shard_without_sha256_that_fails_mid_decode_closes_its_files(tmp_path, monkeypatch, unlinked_files, error):
    """Its unlinked files live only as open handles: a failure must close them (a full disk says
    where the cache goes; any other error passes as it is)."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS]] * 6})
    (shard,) = (tmp_path / "d").rglob("*.parquet")
    real = token_cache.read_shard

    def fails_after_one_batch(path, masked):
        yield next(iter(real(path, masked)))
        raise error

    monkeypatch.setattr(token_cache, "read_shard", fails_after_one_batch)
    said = (DataError, "cannot write the loader's token cache") if isinstance(error, OSError) else (ValueError, "a bad row")
    with pytest.raises(said[0], match=said[1]):
        token_cache.build_shard(shard, None, tmp_path / "cache")
    assert len(unlinked_files) == 2 and all(f.closed for f in unlinked_files)


def test_the_default_cache_is_the_hanyeong_cache_on_local_disk(tmp_path, monkeypatch):
    """Without HANYEONG_LOADER_CACHE: <XDG_CACHE_HOME>/hanyeong/loader, made; the temp folder only
    where it cannot be made."""
    assert token_cache.ENV_CACHE == "HANYEONG_LOADER_CACHE"  # the name tests/conftest.py sets
    monkeypatch.delenv(token_cache.ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for _ in range(2):  # made, then found
        assert token_cache.default_cache_dir() == tmp_path / "xdg" / "hanyeong" / "loader"
        assert (tmp_path / "xdg" / "hanyeong" / "loader").is_dir()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where a folder must go
    assert token_cache.default_cache_dir() == Path(tempfile.gettempdir()) / "hanyeong-loader"
    monkeypatch.setenv(token_cache.ENV_CACHE, str(tmp_path / "mine"))
    assert token_cache.default_cache_dir() == tmp_path / "mine"


def test_the_cache_files_are_shared_as_any_file_the_user_makes(tmp_path):
    """A cache on a shared disk serves the whole group: every file it holds (entries, their json,
    the checked stamps, the lock) has mode 0o666 less the umask, not a temporary file's 0o600."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS]] * 6})
    before = os.umask(0o002)
    try:
        loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache")
    finally:
        os.umask(before)
    files = [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]
    assert {f.suffix for f in files} >= {".i32", ".json"}
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o664) for f in files}



def test_a_shard_without_documents_is_an_empty_entry(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))}), path)
    entry = token_cache.build_shard(path, "ab" * 32, tmp_path / "cache")
    assert (entry.stats["documents"], entry.stats["tokens"], len(entry.lengths)) == (0, 0, 0)
    entry.tokens.close()


@pytest.fixture
def cache_files(monkeypatch) -> list:
    """The files read_entry opens, as it opens them (token_cache.open is found before the builtin)."""
    return recorded_opens(monkeypatch, token_cache, "open", open)


def test_an_entry_keeps_only_its_token_file_open(tmp_path, cache_files):
    """The tokens are read by position for the loader's life; the lengths were read into memory."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS]] * 6})
    (source,) = loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache").sources
    assert [Path(f.name).suffix for f in cache_files] == [".i32", ".i32"]
    assert [f.closed for f in cache_files] == [False, True] and source.tokens.files == [cache_files[0]]



HOLD_LOCK = """import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, int(sys.argv[2]))
print("held", flush=True)
sys.stdin.read()
"""


def test_a_shard_another_process_is_building_is_left_for_later_with_its_files_closed(tmp_path, cache_files):
    """Its entry, read to check it, is closed: the process comes back for it on the second pass."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS]] * 6})
    cache = tmp_path / "cache"
    loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=cache)  # built
    shutil.rmtree(cache / "checked")  # the shard must be hashed again: its build lock is needed
    (shard,) = (tmp_path / "d").rglob("*.parquet")
    sha256 = hashlib.sha256(shard.read_bytes()).hexdigest()
    byte = token_cache.BuildLocks._byte(sha256)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cache / ".build.lock"), str(byte)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        cache_files.clear()
        with token_cache.BuildLocks(cache) as locks:
            assert token_cache.open_shard(shard, sha256, cache, locks, wait=False) is None
        assert len(cache_files) == 2 and all(f.closed for f in cache_files)
    finally:
        holder.communicate("")


TRY_SHARED_LOCK = """import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, int(sys.argv[2]))
except BlockingIOError:
    print("refused")
else:
    print("granted")
"""


@pytest.mark.parametrize("wait", [False, True])
def test_a_held_build_lock_excludes_every_other_process(tmp_path, wait):
    """Exclusive whether taken waiting or not: another process cannot even share it."""
    sha256 = "ab" * 32

    def other_process() -> str:
        lock, byte = str(tmp_path / ".build.lock"), str(token_cache.BuildLocks._byte(sha256))
        return subprocess.run([sys.executable, "-c", TRY_SHARED_LOCK, lock, byte], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip

    with token_cache.BuildLocks(tmp_path) as locks:
        assert locks.acquire(sha256, wait)
        assert other_process() == "refused"
        locks.release(sha256)
        assert other_process() == "granted"


def test_building_an_entry_leaves_open_only_its_token_file(tmp_path):
    """No descriptor leaks (the folder fsynced after the renames, the temporary files): once the
    entry's token file is closed, the process has the descriptors it had before."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS]] * 6})
    (shard,) = (tmp_path / "d").rglob("*.parquet")
    fds = "/proc/self/fd" if Path("/proc/self/fd").is_dir() else "/dev/fd"
    before = len(os.listdir(fds))
    entry = token_cache.build_shard(shard, hashlib.sha256(shard.read_bytes()).hexdigest(), tmp_path / "cache")
    entry.tokens.close()
    assert len(os.listdir(fds)) == before

def test_the_build_locks_file_is_closed_on_leaving(tmp_path):
    with token_cache.BuildLocks(tmp_path) as locks:
        assert locks.acquire("ab" * 32, wait=False)
        locks.release("ab" * 32)
        fd = locks.fd
    with pytest.raises(OSError):
        os.fstat(fd)


def test_the_open_file_limit_is_one_data_error_not_a_rebuild(tmp_path, monkeypatch):
    """EMFILE while opening an entry is no damage: rebuilding would not help, raising the limit does."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, 6, EOS]] * 6})
    loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache")  # built

    def no_more_files(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(token_cache, "open", no_more_files, raising=False)
    monkeypatch.setattr(token_cache, "build_shard", lambda *a: pytest.fail("rebuilt"))
    with pytest.raises(DataError, match=r"too many open files .*raise the limit \(ulimit -n\)"):
        loader(tmp_path, {"sources": [{"dataset": "d"}]}, cache_dir=tmp_path / "cache")

def open_and_read(root: str, config: dict, cache: str, log: str) -> list:
    """In a spawned process: open a loader on `cache`, logging each shard it builds; its batches."""
    real = token_cache.build_shard

    def logged(path, sha256, cache_dir):
        with open(log, "a") as f:
            f.write(f"{sha256}\n")
        return real(path, sha256, cache_dir)

    token_cache.build_shard = logged
    data = loader(Path(root), config, seed=4, seq_len=24, rows=2, cache_dir=cache)
    return [(rows_of(b).tolist(), b.loss_mask.tolist()) for b in read(data, [(24, 2)] * 5)]


def test_processes_opening_at_once_build_each_entry_once(tmp_path):
    """Ranks opening a cold cache at once build each shard's entry exactly once between them (a
    lock per entry), and all of them read the same batches."""
    import multiprocessing

    config, cache, log = mixed(tmp_path), tmp_path / "cache", tmp_path / "built.log"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(open_and_read, [(str(tmp_path), config, str(cache), str(log))] * 3)
    built = log.read_text().split()
    assert sorted(built) == sorted(entries(cache)) and len(built) == 5
    assert results[0] == results[1] == results[2]
    assert not list(cache.glob("*.tmp"))


def test_a_manifest_sha256_that_is_not_one_is_refused_before_it_names_a_cache_file(tmp_path):
    """The sha256 names the cache's files: '../x' must never reach a path, nor a traceback."""
    write_dataset(tmp_path / "d", {"web": [[BOS, 5, EOS]] * 3})
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    manifest["sources"]["web"]["shards"][0]["sha256"] = "../../escape"
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"sha256 must be 64 hex digits, got '\.\./\.\./escape'"):
        loader(tmp_path, {"sources": [{"dataset": "d"}]})
