"""`hanyeong data prepare`: ingest -> clean -> filter -> dedup -> decontaminate -> tokenize.

Documents go through in chunks of BATCH_DOCUMENTS in their global order (source, file, position).
1. Ray tasks read the files (the driver does, through `read_corpus`, when the cluster has other
   machines, which need not see the inputs) and leave each file's texts in the object store, chunk
   by chunk; the driver gets each file's report, in file order.
2. A Ray task per chunk does the per-document work of every step (`prepare_tasks.check_chunk`:
   language, clean, filter, normalize, dedup fingerprints, decontamination check) and returns
   counts, fingerprints and matches; the surviving texts stay in the object store.
3. The driver settles chunks in order (`Steps.settle`): the sequential deduplicator decides from the
   fingerprints which documents repeat one kept before, decontamination matches drop the rest that
   hit a benchmark, and the kept documents go to ShardWriter, whose Ray tasks fetch their
   texts, tokenize them and write the shards.
Chunks are cut the same way whatever the worker count and are settled in order, so the dataset is
byte for byte the one a single process makes (`chunk_tasks=0` runs every chunk in this process).
The driver's own work per document is a few dictionary lookups (dedup); it holds the dedup tables
(~1.5 KB per kept document) and the chunks in flight, and on one machine no text passes through it.
Every document read ends up kept or dropped by one named reason (the ledger); every step's counts
go into the manifest.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from orchestration.data.config import PrepareConfig
from orchestration.data.decontaminate import Match, benchmark_files, build_index
from orchestration.data.dedup import Deduplicator
from orchestration.data.documents import IngestReport, Source, resolve_sources
from orchestration.data.ledger import Ledger
from hanyeong.errors import DataError

BATCH_DOCUMENTS = 4096  # documents per chunk (a Ray task's work)
EXAMPLES = 50  # decontamination matches kept in the manifest for auditing


@dataclass
class Survivor:
    """A document that passed clean and filter, waiting for the driver's dedup decision."""

    source: str
    id: str
    language: str
    text: object  # its cleaned text, or (reference to its chunk's texts, index) in Ray
    nbytes: int
    duplicate: str | None  # dedup's reason: exact, near or None
    match: Match | None  # the benchmark window it shares, if any


@dataclass
class Steps:
    """The ordered part of the steps, in the driver, and what every step counted."""

    config: PrepareConfig
    ledger: Ledger = field(default_factory=Ledger)
    dedup: Deduplicator | None = None
    cleaned_changed: int = 0
    examples: list[dict] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)  # per step, in tasks and here

    def settle(self, chunk, result, texts) -> list[Survivor]:
        """Count a checked chunk (`prepare_tasks.Chunk`, its `ChunkResult`) and decide, in document
        order, which of its documents are kept."""
        self.ledger.merge(result.ledger)
        self.cleaned_changed += result.changed
        self.seconds.update(result.seconds)
        start = time.perf_counter()
        n = len(result.survivors)
        duplicates = self.dedup.decide(result.fingerprints) if self.dedup else [None] * n
        self.seconds["dedup"] += time.perf_counter() - start
        located = isinstance(texts, list)
        survivors = [
            Survivor(
                chunk.source,
                chunk.id(i),
                result.languages[k],
                texts[k] if located else (texts, k),
                result.nbytes[k],
                duplicates[k],
                result.matches[k] if result.matches is not None else None,
            )
            for k, i in enumerate(result.survivors)
        ]
        survivors = self.deduplicate(survivors)
        survivors = self.decontaminate(survivors)
        for survivor in survivors:
            self.ledger.keep(survivor.source, survivor.language)
        return survivors

    def _drop(self, survivor: Survivor, step: str, reason: str) -> None:
        self.ledger.drop(survivor.source, survivor.language, step, reason)

    def deduplicate(self, survivors: list[Survivor]) -> list[Survivor]:
        kept = []
        for survivor in survivors:
            if survivor.duplicate is None:
                kept.append(survivor)
            else:
                self._drop(survivor, "dedup", survivor.duplicate)
        return kept

    def decontaminate(self, survivors: list[Survivor]) -> list[Survivor]:
        kept = []
        for survivor in survivors:
            match = survivor.match
            if match is None:
                kept.append(survivor)
                continue
            self._drop(survivor, "decontaminate", match.benchmark)
            if len(self.examples) < EXAMPLES:
                example = {"source": survivor.source, "id": survivor.id}
                self.examples.append({**example, "benchmark": match.benchmark, "window": match.window})
        return kept


def read_chunks(sources: list[Source], report: IngestReport, workers: int = 1):
    """The documents of sources as `Chunk`s of BATCH_DOCUMENTS texts, a file at a time, in sorted
    file order (`documents.read_documents`, leaving language detection to the chunk's task), and
    after a source's last chunk, its name. `workers` processes read files."""
    from orchestration.data.prepare_tasks import Chunk
    from tokenizer.corpus import read_corpus

    size = BATCH_DOCUMENTS  # read when called: tests cut smaller chunks
    for source in sources:
        prefixes = {str(path): prefix for path, prefix in source.files}
        paths = [path for path, _ in source.files]
        for texts, file_report in read_corpus(paths, source.fields, workers=workers):
            report.add(file_report)
            prefix = prefixes[file_report.path]
            for start in range(0, len(texts), size):
                part = texts[start : start + size]
                yield Chunk(source.name, prefix, start, part, len(part))
        yield source.name


def prepare(
    inputs: list[str],
    tokenizer: str | Path,
    out: str | Path,
    config: PrepareConfig,
    text_fields: list[str] | None = None,
    num_cpus: int | None = None,
    address: str | None = None,
    workers: int = 1,
    progress: bool = False,
    force: bool = False,
    chunk_tasks: int | None = None,
) -> dict:
    """Build the dataset `out` from `inputs` (and the config's sources); returns its manifest.

    When `out` already holds a dataset built from the same inputs, config and tokenizer, and its
    shards are intact, nothing is done (the manifest comes back with `"up_to_date": true`).
    At most `chunk_tasks` chunks are checked in Ray tasks at once (None: two per CPU of the Ray
    cluster; 0: in this process, files read by `workers` processes), with the same result.
    """
    from orchestration.data import manifest as mf
    from orchestration.data.prepare_tasks import ChunkRunner
    from orchestration.data.shards import ShardWriter, ray_session, tokenizer_info

    out = Path(out)
    sources = resolve_sources(inputs, text_fields, config.sources)
    tok = tokenizer_info(tokenizer)
    config_dict = config.to_dict()
    bench_files = [
        str(f)
        for b in config.decontaminate.benchmarks
        for f in benchmark_files(b, config.decontaminate.root)
    ]
    input_files = [str(path) for s in sources for path, _ in s.files]
    layout = {s.name: [[mf.input_sha256(path), prefix] for path, prefix in s.files] for s in sources}
    fingerprint = mf.inputs_hash(
        {"config": config.settings(), "text_fields": text_fields, "sources": layout},
        input_files + bench_files,
        tok,
    )
    if not force and (existing := mf.up_to_date(out, fingerprint)) is not None:
        return {**existing, "up_to_date": True}
    mf.check_replaceable(out)

    started = time.perf_counter()
    steps = Steps(
        config,
        dedup=Deduplicator(config.dedup) if config.dedup.exact or config.dedup.near else None,
    )
    index = None
    if config.decontaminate.enabled and config.decontaminate.benchmarks:
        index = build_index(config.decontaminate)
    ingest = IngestReport()
    tmp = mf.staging_dir(out)
    try:
        with ExitStack() as stack:  # Ray starts when first needed, and stops when the run ends
            ray = []

            def connect():
                if not ray:
                    ray.append(stack.enter_context(ray_session(num_cpus, address)))
                return ray[0]

            runner = ChunkRunner(config, index, connect, chunk_tasks)
            writer = ShardWriter(tmp, tok, config.shards, connect)
            shards = _run(sources, steps, ingest, runner, writer, workers, progress)
            steps.seconds["waiting_for_ray"] = runner.waited + writer.waited
        if ingest.documents == 0:
            raise DataError(_nothing_readable(ingest))
        unaccounted = steps.ledger.unaccounted()
        assert not unaccounted, f"documents lost without a reason: {unaccounted}"
        manifest = _manifest(steps, ingest, shards, tok, config_dict, fingerprint, index)
        manifest["inputs"] = {"paths": [str(p) for p in inputs], "text_fields": text_fields}
        manifest["seconds"] = {
            **{k: round(v, 2) for k, v in steps.seconds.items()},
            "total": round(time.perf_counter() - started, 2),
        }
        mf.publish(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _run(
    sources: list[Source],
    steps: Steps,
    ingest: IngestReport,
    runner,
    writer,
    workers: int,
    progress: bool,
) -> dict[str, list[dict]]:
    from tqdm import tqdm

    # disable=None: bars on a terminal only, so logs and captured stderr stay clean
    read_bar = tqdm(
        desc="prepare", unit="doc", disable=None if progress else True, file=sys.stderr, position=0
    )
    token_bar = tqdm(
        desc="tokenize", unit="doc", disable=None if progress else True, file=sys.stderr, position=1
    )
    writer.progress = token_bar

    def settle(ready: list) -> None:
        for chunk, result, texts in ready:
            if result is None:  # a source's last chunk is settled: its last shard goes to Ray now
                writer.finish(chunk)
                continue
            for s in steps.settle(chunk, result, texts):
                writer.add_text(s.source, s.id, s.language, s.text, s.nbytes)
            read_bar.update(len(chunk.texts))

    try:
        if runner.reads_files():
            chunks = runner.read(sources, ingest, BATCH_DOCUMENTS)
        else:
            chunks = read_chunks(sources, ingest, workers)
        for chunk in chunks:
            if isinstance(chunk, str):  # a source's last chunk was queued before this
                settle(runner.mark(chunk))
                continue
            read_bar.set_postfix_str(chunk.source, refresh=False)
            # the driver keeps the chunk's name and place, not its texts, until it is settled
            header = dataclasses.replace(chunk, texts=range(chunk.size))
            settle(runner.submit(chunk, header))
        settle(runner.ready(0))
        return writer.close()
    finally:
        read_bar.close()
        token_bar.close()


def _nothing_readable(ingest: IngestReport) -> str:
    skipped = "; ".join(f"{Path(f['path']).name} ({f['reason']})" for f in ingest.skipped_files[:5])
    more = len(ingest.skipped_files) - 5
    return f"no readable documents in the inputs: {skipped}" + (
        f"; and {more} more" if more > 0 else ""
    )


def _manifest(
    steps: Steps,
    ingest: IngestReport,
    shards: dict,
    tok: dict,
    config: dict,
    fingerprint: str,
    index,
) -> dict:
    from orchestration.data import manifest as mf

    ledger = steps.ledger
    sources = {}
    for name, entry in ledger.by_source().items():
        parts = shards.get(name, [])
        languages = entry["languages"]
        for shard in parts:
            for lang, counts in shard.pop("languages").items():
                languages[lang]["tokens"] = languages[lang].get("tokens", 0) + counts["tokens"]
        sources[name] = {
            "documents": entry["kept"],
            "tokens": sum(s["tokens"] for s in parts),
            "shards": parts,
            "read": entry["read"],
            "dropped": entry["dropped"],
            "languages": languages,
        }
    read = sum(s["read"] for s in sources.values())
    cleaned = read - sum(ledger.dropped("clean").values())
    filtered = cleaned - sum(ledger.dropped("filter").values())
    deduped = filtered - sum(ledger.dropped("dedup").values())
    kept = deduped - sum(ledger.dropped("decontaminate").values())
    dedup = steps.dedup
    step_list = [
        ingest.to_dict(),
        {
            "step": "clean",
            "documents_in": read,
            "changed": steps.cleaned_changed,
            "dropped": ledger.dropped("clean"),
            "documents_out": cleaned,
        },
        {
            "step": "filter",
            "documents_in": cleaned,
            "dropped": ledger.dropped("filter"),
            "documents_out": filtered,
        },
        {
            "step": "dedup",
            "documents_in": filtered,
            "dropped": ledger.dropped("dedup"),
            "documents_out": deduped,
            "lsh": {"bands": dedup.bands, "rows": dedup.rows} if dedup else None,
        },
        {
            "step": "decontaminate",
            "documents_in": deduped,
            "dropped": ledger.dropped("decontaminate"),
            "documents_out": kept,
            "benchmarks": index.stats if index else {},
            "examples": steps.examples,
        },
        {
            "step": "tokenize",
            "documents": kept,
            "tokens": sum(s["tokens"] for s in sources.values()),
            "shards": sum(len(s["shards"]) for s in sources.values()),
        },
    ]
    return {
        "format": mf.FORMAT,
        "version": mf.VERSION,
        "tokenizer": tok,
        "sources": sources,
        "steps": step_list,
        "config": config,
        "inputs_hash": fingerprint,
        "content_hash": mf.content_hash(tok, sources),
    }
