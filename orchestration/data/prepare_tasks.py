"""The per-document steps of `prepare` over one chunk of documents: the work its Ray tasks do.

Language detection -> clean -> filter -> normalize -> dedup fingerprints (exact hash, MinHash
signature, LSH band hashes) -> decontamination check. Each depends on the document alone, so chunks
may run on any worker in any order. What depends on earlier documents (does this one repeat one
kept before?) is decided afterwards in the driver, in document order, from the fingerprints
(`prepare.Steps`): `Deduplicator.decide` is the sequential deduplicator itself, fed what its
`check` would compute, so the kept documents are the same whatever the number of workers.
Decontamination checks every document that passed the filter; the driver applies a match only to
a document dedup keeps, so the ledger and the manifest's examples read as if the steps had run one
after the other.

Why the dedup decision stays in one ordered pass rather than in tasks sharded by band hash: "the
first document seen is kept" makes a document's fate depend on which earlier documents were kept,
and a bucket remembers only its first BUCKET_CAP kept documents; an exact replay of that needs
every document's band hashes in order anyway, and the lookups cost ~8 µs a document (11 MB/s of
short reviews, ~30 MB/s at 250 bytes a document), while the per-document steps run at ~1 MB/s a
core: the driver keeps up with ten or more cores. Sharding the tables by band hash would cut the
driver's memory (~1.5 KB per kept document) more than its time; it is the next step at scale.

Files are read by `_read_task`, a generator task that leaves a file's texts in the object store
chunk by chunk; a chunk's cleaned texts come back as a second object that stays there too. The
driver cuts shards by the byte counts it is given and hands the tokenize tasks references to the
texts, so on one machine the corpus never passes through the driver. `check_chunk` runs alone
(tests, and `prepare(chunk_tasks=0)`, call it in this process); `ChunkRunner` submits it as Ray
tasks.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from orchestration.data.clean import clean_text
from orchestration.data.config import DedupConfig, PrepareConfig
from orchestration.data.decontaminate import BenchmarkIndex, Decontaminator, Match
from orchestration.data.dedup import Deduplicator, Fingerprints
from orchestration.data.documents import Document, IngestReport, Source
from orchestration.data.filters import quality_reasons
from orchestration.data.fingerprint import normalize
from orchestration.data.ledger import Ledger
from tokenizer.language import detect_language
from hanyeong.errors import HanyeongError

_INDEXES: dict[str, BenchmarkIndex] = {}  # the benchmark index a worker process got, by object id


@dataclass
class Chunk:
    """Documents `start`, `start + 1`, ... of one file of a source, as read (ids `<prefix>#<n>`)."""

    source: str
    prefix: str
    start: int
    texts: list[str]  # or, read in Ray, a reference to them in the object store
    size: int  # len(texts)

    def id(self, i: int) -> str:
        return f"{self.prefix}#{self.start + i}"


@dataclass
class ChunkResult:
    """What the driver needs of a chunk: reads and drops so far, and per document that passed the
    filter (a survivor) its language, text size, dedup fingerprints and decontamination match."""

    survivors: list[int]  # positions in the chunk, in order
    languages: list[str]  # of each survivor (tokenizer.language)
    nbytes: list[int]  # UTF-8 bytes of each survivor's cleaned text: shards are cut by them
    fingerprints: Fingerprints | None  # None when dedup is off
    matches: list[Match | None] | None  # None when there is no benchmark
    ledger: Ledger = field(default_factory=Ledger)  # every document read, clean and filter drops
    changed: int = 0  # texts the clean step changed
    seconds: Counter = field(default_factory=Counter)


@cache
def fingerprinter(config: DedupConfig) -> Deduplicator:
    """A Deduplicator used only for `fingerprint` (stateless): one per worker process and config."""
    return Deduplicator(config)


def check_chunk(
    config: PrepareConfig, index: BenchmarkIndex | None, chunk: Chunk
) -> tuple[ChunkResult, list[str]]:
    """Clean, filter, fingerprint and decontamination-check a chunk: (result, survivors' texts)."""
    ledger, seconds, changed = Ledger(), Counter(), 0
    start = time.perf_counter()
    docs = [
        Document(chunk.id(i), chunk.source, detect_language(text), text)
        for i, text in enumerate(chunk.texts)
    ]
    cleaned = []
    for i, doc in enumerate(docs):
        ledger.add_read(doc.source, doc.language)
        text = clean_text(doc.text, config.clean)
        changed += text != doc.text
        doc.text = text
        if text:
            cleaned.append(i)
        else:
            ledger.drop(doc.source, doc.language, "clean", "empty")
    seconds["clean"], start = time.perf_counter() - start, time.perf_counter()
    reasons = quality_reasons(
        [docs[i].text for i in cleaned], config.filters, [docs[i].language for i in cleaned]
    )
    survivors = []
    for i, reason in zip(cleaned, reasons):
        if reason is None:
            survivors.append(i)
        else:
            ledger.drop(docs[i].source, docs[i].language, "filter", reason)
    texts = [docs[i].text for i in survivors]
    seconds["filter"], start = time.perf_counter() - start, time.perf_counter()
    # dedup and decontamination compare the same normalized form: compute it once
    normalized = [normalize(text) for text in texts]
    seconds["normalize"], start = time.perf_counter() - start, time.perf_counter()
    dedup = config.dedup
    fingerprints = (
        fingerprinter(dedup).fingerprint(normalized) if dedup.exact or dedup.near else None
    )
    seconds["dedup"], start = time.perf_counter() - start, time.perf_counter()
    matches = Decontaminator(index).check(normalized) if index is not None else None
    seconds["decontaminate"] = time.perf_counter() - start
    result = ChunkResult(
        survivors,
        [docs[i].language for i in survivors],
        [len(text.encode("utf-8", "surrogatepass")) for text in texts],
        fingerprints,
        matches,
        ledger,
        changed,
        seconds,
    )
    return result, texts


def _check_chunk_task(config: PrepareConfig, boxed_index: list, header: Chunk, texts: list):
    # The index comes boxed in a list, so Ray hands over its reference rather than a copy per task;
    # a worker fetches it once (its numpy arrays are read in place from the object store).
    index = None
    if boxed_index:
        import ray

        key = boxed_index[0].hex()
        if key not in _INDEXES:
            _INDEXES.clear()
            _INDEXES[key] = ray.get(boxed_index[0])
        index = _INDEXES[key]
    return check_chunk(config, index, dataclasses.replace(header, texts=texts))


def _read_task(path: str, fields, size: int):
    # A generator task: the file's report, then its texts in chunks of `size`. The driver owns each
    # chunk's object but never fetches it: the chunk's check task does.
    from tokenizer.corpus import read_file

    texts, report = read_file(Path(path), fields)
    yield report
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


class ChunkRunner:
    """Runs `check_chunk` on chunks in submission order: in Ray tasks, at most `in_flight` at a
    time (None: two per CPU of the cluster), or in this process when `in_flight` is 0."""

    def __init__(self, config: PrepareConfig, index, connect, in_flight: int | None = None):
        """`connect()` returns the ray module; it is called when Ray is first needed."""
        self.config, self.index, self.connect, self.in_flight = config, index, connect, in_flight
        self.ray = self.task = self.reader = None
        self.boxed_index: list = []
        self.pending: deque = deque()  # (payload, result ref or result, texts ref or texts)
        self.waited = 0.0  # seconds spent waiting for tasks

    def reads_files(self) -> bool:
        """Whether Ray tasks should read the input files: only when every node of the cluster is
        this machine, since the inputs need not be on storage other nodes share."""
        if self.in_flight == 0:
            return False
        self._start()
        here = self.ray.get_runtime_context().get_node_id()
        return all(node["NodeID"] == here for node in self.ray.nodes() if node["Alive"])

    def _start(self) -> None:
        if self.ray is not None:
            return
        self.ray = self.connect()
        self.task = self.ray.remote(num_cpus=1, max_retries=2, num_returns=2)(_check_chunk_task)
        self.reader = self.ray.remote(num_cpus=1, max_retries=2)(_read_task)
        if self.in_flight is None:
            self.in_flight = 2 * max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        if self.index is not None:
            self.boxed_index = [self.ray.put(self.index)]

    def _get(self, ref):
        start = time.perf_counter()
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, HanyeongError):
                raise err.cause from None
            raise
        finally:
            self.waited += time.perf_counter() - start

    def _next(self, chunks):
        start = time.perf_counter()
        ref = next(chunks)  # waits until the reading task has yielded it
        self.waited += time.perf_counter() - start
        return ref

    def read(self, sources: list[Source], report: IngestReport, size: int) -> Iterator:
        """The chunks of `sources` in order, read by Ray tasks a few files ahead (their texts stay
        in the object store: `Chunk.texts` is a reference), and after a source's last chunk, its
        name. Each file's report goes to `report` in file order, as `read_corpus` gives them."""
        self._start()
        files = [(source, path, prefix) for source in sources for path, prefix in source.files]
        reading: deque = deque()
        for i, (source, path, prefix) in enumerate(files):
            while len(reading) < max(1, self.in_flight) and i + len(reading) < len(files):
                ahead, ahead_path, _ = files[i + len(reading)]
                reading.append(self.reader.remote(str(ahead_path), ahead.fields, size))
            chunks = reading.popleft()
            file_report = self._get(self._next(chunks))
            report.add(file_report)
            for first in range(0, file_report.documents, size):
                n = min(size, file_report.documents - first)
                yield Chunk(source.name, prefix, first, self._next(chunks), n)
            if i + 1 == len(files) or files[i + 1][0] is not source:
                yield source.name

    def submit(self, chunk: Chunk, payload) -> list:
        """Queue a chunk; the (payload, result, texts) of chunks settled to stay within the bound."""
        if self.in_flight == 0:
            self.pending.append((payload, *check_chunk(self.config, self.index, chunk)))
            return self.ready(0)
        self._start()
        header = dataclasses.replace(chunk, texts=[])
        result, texts = self.task.remote(self.config, self.boxed_index, header, chunk.texts)
        self.pending.append((payload, result, texts))
        return self.ready(self.in_flight - 1)

    def ready(self, keep: int) -> list:
        """Settle the oldest chunks until at most `keep` are pending: [(payload, result, texts)];
        in Ray, `texts` stays a reference to the survivors' texts in the object store."""
        out = []
        while len(self.pending) > keep:
            payload, result, texts = self.pending.popleft()
            if self.ray is not None and result is not None:
                result = self._get(result)
            out.append((payload, result, texts))
        return out

    def mark(self, payload) -> list:
        """Queue a marker (no chunk) that comes back, in order, once every chunk before it has."""
        self.pending.append((payload, None, None))
        return self.ready(self.in_flight or 0)
