"""Tokenize: kept documents -> Parquet shards, encoded in parallel Ray tasks.

THE SHARD CONTRACT (the training loader reads exactly this): `shards/<source>/part-00000.parquet`, ...
with columns `id` (string), `language` (string) and `input_ids` (list<int32>: [BOS] ids... [EOS]).
Shards are numbered per source in document order, so a re-run writes the same files.

`tokenize_shard` runs alone (tests call it in-process); `ShardWriter` cuts each source's documents
into shards and submits one Ray task per shard, a bounded number in flight. A document's text may be
a reference into a list of texts in Ray's object store (`prepare_tasks` leaves cleaned texts there):
the task fetches them itself. Each task writes its file itself, so with `--address` the output
folder must be on storage every node shares. This module and `prepare_tasks` are the only ones that
import ray, and only inside functions.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from orchestration.data.config import ShardConfig
from orchestration.data.documents import Document
from hanyeong.errors import DataError, HanyeongError
from orchestration.cluster.ray_session import ray_session  # noqa: F401  (callers import it from here too)

_TOKENIZERS: dict[str, object] = {}  # one loaded tokenizer per worker process


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_info(path: str | Path) -> dict:
    """{path, sha256, vocab_size, bos_id, eos_id} of a trained tokenizer (its [BOS] and [EOS] ids)."""
    from tokenizer.bbpe import TOKENIZER_FILE, BBPETokenizer

    path = Path(path)
    tok = BBPETokenizer.load(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    ids = {name: tok.hf.token_to_id(name) for name in ("[BOS]", "[EOS]")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise DataError(f"{path}: the tokenizer has no {' or '.join(missing)} token")
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(file),
        "vocab_size": tok.vocab_size,
        "bos_id": ids["[BOS]"],
        "eos_id": ids["[EOS]"],
    }


def tokenize_shard(
    tokenizer: dict,
    out: str,
    ids: list[str],
    languages: list[str],
    texts: list[str],
    compression: str = "zstd",
) -> dict:
    """Encode texts as [BOS] ids [EOS] and write one Parquet shard to `out`; returns its counts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hanyeong.files import write_atomic
    from tokenizer.bbpe import BBPETokenizer

    tok = _TOKENIZERS.get(tokenizer["sha256"])
    if tok is None:
        tok = _TOKENIZERS[tokenizer["sha256"]] = BBPETokenizer.load(tokenizer["path"])
    encoded = tok.encode_batch(texts)
    lengths = np.fromiter((len(e) + 2 for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.int32)
    values[offsets[:-1]] = tokenizer["bos_id"]
    values[offsets[1:] - 1] = tokenizer["eos_id"]
    for e, start in zip(encoded, offsets[:-1].tolist()):
        values[start + 1 : start + 1 + len(e)] = e
    input_ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "language": pa.array(languages, pa.string()),
            "input_ids": input_ids,
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=None if compression == "none" else compression)
    data = sink.getvalue().to_pybytes()
    write_atomic(Path(out), data)
    per_language: dict[str, dict] = {}
    for language, n in zip(languages, lengths.tolist()):
        entry = per_language.setdefault(language, {"documents": 0, "tokens": 0})
        entry["documents"] += 1
        entry["tokens"] += n
    return {
        "documents": len(ids),
        "tokens": int(offsets[-1]),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "languages": per_language,
    }


def _tokenize_task(tokenizer, out, ids, languages, texts, compression) -> dict:
    # One CPU per task: the tokenizer must not start its own thread pool on top of Ray's workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if not all(isinstance(text, str) for text in texts):
        import ray

        # runs of (a chunk's texts in the object store, indices): fetch each chunk once
        chunks = iter(ray.get([run[0] for run in texts if not isinstance(run, str)]))
        runs, texts = texts, []
        for run in runs:
            if isinstance(run, str):
                texts.append(run)
            else:
                chunk = next(chunks)
                texts.extend(chunk[i] for i in run[1])
    return tokenize_shard(tokenizer, out, ids, languages, texts, compression)


def _runs(texts: list) -> list:
    """Texts with those that lie in the object store, (reference, index), grouped into runs
    (reference, [indices]) of one chunk."""
    runs: list = []
    for text in texts:
        if isinstance(text, str):
            runs.append(text)
        elif runs and not isinstance(runs[-1], str) and runs[-1][0] is text[0]:
            runs[-1][1].append(text[1])
        else:
            runs.append((text[0], [text[1]]))
    return runs


class ShardWriter:
    """Buffers each source's documents, submits a Ray task per full shard, gathers the results."""

    def __init__(self, root: Path, tokenizer: dict, config: ShardConfig, connect, progress=None):
        """`connect()` returns the ray module; it is called when the first shard is submitted, so a run
        that keeps no document never starts Ray."""
        self.root, self.tokenizer, self.config, self.connect = root, tokenizer, config, connect
        self.ray = self.task = None
        self.max_in_flight = 2
        self.buffers: dict[str, tuple[list[str], list[str], list[str]]] = {}
        self.buffered_bytes: dict[str, int] = {}
        self.next_part: dict[str, int] = {}
        self.pending: dict = {}  # ObjectRef -> (source, relative path)
        self.done: dict[str, dict[str, dict]] = {}  # source -> relative path -> result
        self.progress = progress
        self.waited = 0.0  # seconds spent waiting for tasks

    def add(self, doc: Document) -> None:
        size = len(doc.text.encode("utf-8", "surrogatepass"))
        self.add_text(doc.source, doc.id, doc.language, doc.text, size)

    def add_text(self, source: str, id: str, language: str, text, nbytes: int) -> None:
        """Add a document; `text` is a str, or (reference to a list of texts in Ray's object store,
        index in it), and `nbytes` its size in UTF-8 bytes (where the shard is cut)."""
        ids, languages, texts = self.buffers.setdefault(source, ([], [], []))
        ids.append(id)
        languages.append(language)
        texts.append(text)
        size = self.buffered_bytes.get(source, 0) + nbytes
        self.buffered_bytes[source] = size
        if size >= self.config.text_bytes_per_shard or len(ids) >= self.config.documents_per_shard:
            self._submit(source)

    def _submit(self, source: str) -> None:
        ids, languages, texts = self.buffers.pop(source)
        self.buffered_bytes.pop(source)
        part = self.next_part.get(source, 0)
        self.next_part[source] = part + 1
        rel = f"shards/{source}/part-{part:05d}.parquet"
        if self.ray is None:
            self.ray = self.connect()
            self.task = self.ray.remote(num_cpus=1, max_retries=2)(_tokenize_task)
            self.max_in_flight = 2 * max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        while len(self.pending) >= self.max_in_flight:  # bounded memory: wait for a shard to finish
            self._collect(1)
        ref = self.task.remote(
            self.tokenizer,
            str(self.root / rel),
            ids,
            languages,
            _runs(texts),
            self.config.compression,
        )
        self.pending[ref] = (source, rel)

    def _collect(self, n: int) -> None:
        start = time.perf_counter()
        ready, _ = self.ray.wait(list(self.pending), num_returns=n)
        self.waited += time.perf_counter() - start
        for ref in ready:
            source, rel = self.pending.pop(ref)
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, HanyeongError):
                    raise err.cause from None
                raise
            self.done.setdefault(source, {})[rel] = {"path": rel, **result}
            if self.progress is not None:
                self.progress.update(result["documents"])

    def finish(self, source: str) -> None:
        """A source has no more documents: submit its last, partly filled shard now."""
        if source in self.buffers:
            self._submit(source)

    def close(self) -> dict[str, list[dict]]:
        """Submit what is buffered, wait for every task; {source: [shard results in part order]}."""
        for source in list(self.buffers):
            self._submit(source)
        while self.pending:
            self._collect(len(self.pending))
        return {s: [shards[k] for k in sorted(shards)] for s, shards in sorted(self.done.items())}
