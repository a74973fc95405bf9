"""`hanyeong data prepare`: ingest -> clean -> filter -> dedup -> decontaminate -> tokenize.

Documents stream through the steps a file at a time, in batches; kept documents go to Ray tasks that
tokenize and write shards while the next batches are processed. Every document read ends up kept or
dropped by one named reason (the ledger); every step's counts go into the manifest.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from orchestration.data.clean import clean_text
from orchestration.data.config import PrepareConfig
from orchestration.data.decontaminate import Decontaminator, benchmark_files, build_index
from orchestration.data.dedup import Deduplicator
from orchestration.data.documents import (
    Document,
    IngestReport,
    Source,
    read_documents,
    resolve_sources,
)
from orchestration.data.filters import quality_reasons
from orchestration.data.fingerprint import normalize
from orchestration.data.ledger import Ledger
from hanyeong.errors import DataError

BATCH_DOCUMENTS = 4096  # documents per pass through the steps
EXAMPLES = 50  # decontamination matches kept in the manifest for auditing


@dataclass
class Steps:
    """The per-document steps, and what they counted."""

    config: PrepareConfig
    ledger: Ledger = field(default_factory=Ledger)
    dedup: Deduplicator | None = None
    decontaminator: Decontaminator | None = None
    cleaned_changed: int = 0
    examples: list[dict] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)

    def _drop(self, doc: Document, step: str, reason: str) -> None:
        self.ledger.drop(doc.source, doc.language, step, reason)

    def run(self, docs: list[Document]) -> list[Document]:
        """The documents of a batch that survive every step, in order."""
        docs = self._timed("clean", self.clean, docs)
        docs = self._timed("filter", self.filter, docs)
        # dedup and decontamination compare the same normalized form: compute it once
        pairs = self._timed("normalize", lambda ds: [(d, normalize(d.text)) for d in ds], docs)
        pairs = self._timed("dedup", self.deduplicate, pairs)
        pairs = self._timed("decontaminate", self.decontaminate, pairs)
        for doc, _ in pairs:
            self.ledger.keep(doc.source, doc.language)
        return [doc for doc, _ in pairs]

    def _timed(self, name: str, step, items: list) -> list:
        start = time.perf_counter()
        items = step(items)
        self.seconds[name] += time.perf_counter() - start
        return items

    def clean(self, docs: list[Document]) -> list[Document]:
        kept = []
        for doc in docs:
            text = clean_text(doc.text, self.config.clean)
            self.cleaned_changed += text != doc.text
            doc.text = text
            if text:
                kept.append(doc)
            else:
                self._drop(doc, "clean", "empty")
        return kept

    def filter(self, docs: list[Document]) -> list[Document]:
        texts, languages = [d.text for d in docs], [d.language for d in docs]
        kept = []
        for doc, reason in zip(docs, quality_reasons(texts, self.config.filters, languages)):
            if reason is None:
                kept.append(doc)
            else:
                self._drop(doc, "filter", reason)
        return kept

    def deduplicate(self, pairs: list[tuple[Document, str]]) -> list[tuple[Document, str]]:
        if self.dedup is None:
            return pairs
        kept = []
        for pair, reason in zip(pairs, self.dedup.check([norm for _, norm in pairs])):
            if reason is None:
                kept.append(pair)
            else:
                self._drop(pair[0], "dedup", reason)
        return kept

    def decontaminate(self, pairs: list[tuple[Document, str]]) -> list[tuple[Document, str]]:
        if self.decontaminator is None:
            return pairs
        kept = []
        for pair, match in zip(pairs, self.decontaminator.check([norm for _, norm in pairs])):
            if match is None:
                kept.append(pair)
                continue
            doc = pair[0]
            self._drop(doc, "decontaminate", match.benchmark)
            if len(self.examples) < EXAMPLES:
                example = {"source": doc.source, "id": doc.id, "benchmark": match.benchmark}
                self.examples.append({**example, "window": match.window})
        return kept


def batches(docs: list[Document], size: int = BATCH_DOCUMENTS):
    for start in range(0, len(docs), size):
        yield docs[start : start + size]


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
) -> dict:
    """Build the dataset `out` from `inputs` (and the config's sources); returns its manifest.

    When `out` already holds a dataset built from the same inputs, config and tokenizer, and its
    shards are intact, nothing is done (the manifest comes back with `"up_to_date": true`).
    """
    from orchestration.data import manifest as mf
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
        steps.decontaminator = Decontaminator(index)
    ingest = IngestReport()
    tmp = mf.staging_dir(out)
    try:
        with ExitStack() as stack:  # Ray starts with the first shard, and stops when the run ends
            writer = ShardWriter(
                tmp, tok, config.shards, lambda: stack.enter_context(ray_session(num_cpus, address))
            )
            shards = _run(sources, steps, ingest, writer, workers, progress)
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
    sources: list[Source], steps: Steps, ingest: IngestReport, writer, workers: int, progress: bool
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
    try:
        for source in sources:
            read_bar.set_postfix_str(source.name)
            for docs in read_documents(source, ingest, workers=workers):
                for batch in batches(docs):
                    for doc in batch:
                        steps.ledger.add_read(doc.source, doc.language)
                    for doc in steps.run(batch):
                        writer.add(doc)
                    read_bar.update(len(batch))
            writer.finish(source.name)  # its buffer goes to Ray now, not at the end of the run
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
