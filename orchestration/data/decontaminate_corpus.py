"""`hanyeong data decontaminate`: the decontamination step alone, on raw inputs.

Writes, in the output folder: `documents/<source>.jsonl` (the kept documents, text unchanged:
id, language, text; `hanyeong data prepare OUT/documents` reads them back as the same sources),
`removed.jsonl` (each removed document with its benchmark and the shared normalized window) and
`report.json` (counts per source and benchmark, the benchmarks' sizes, files skipped, speed). The
folder is written beside its destination and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from orchestration.data.config import DecontaminateConfig
from orchestration.data.decontaminate import Decontaminator, build_index
from orchestration.data.documents import IngestReport, Source, read_documents, resolve_sources
from orchestration.data.fingerprint import normalize
from hanyeong.errors import ConfigError, DataError

REPORT_FORMAT = "hanyeong-decontamination"
# A lone surrogate (possible in JSON input) is written as \udXXX: still valid JSON, read back as is.
JSONL = {"encoding": "utf-8", "errors": "backslashreplace"}


@dataclasses.dataclass
class Timing:
    text_bytes: int = 0
    check_seconds: float = 0.0


def decontaminate_corpus(
    inputs: list[str],
    config: DecontaminateConfig,
    out: str | Path,
    sources=(),
    text_fields: list[str] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> dict:
    """Drop the documents of `inputs` that share a window with a benchmark; returns the report."""
    from tqdm import tqdm

    from orchestration.data.manifest import staging_dir

    if not config.benchmarks:
        raise ConfigError("decontaminate.benchmarks: the config names no benchmark")
    out = Path(out)
    _check_replaceable(out)
    resolved = resolve_sources(inputs, text_fields, sources)
    started = time.perf_counter()
    index = build_index(config)
    index_seconds = time.perf_counter() - started
    checker, ingest, timing, per_source = Decontaminator(index), IngestReport(), Timing(), {}
    tmp = staging_dir(out)
    try:
        (tmp / "documents").mkdir()
        bar = tqdm(
            desc="decontaminate", unit="doc", disable=None if progress else True, file=sys.stderr
        )
        with open(tmp / "removed.jsonl", "w", **JSONL) as removed:
            for source in resolved:
                with open(tmp / "documents" / f"{source.name}.jsonl", "w", **JSONL) as kept:
                    per_source[source.name] = _check_source(
                        source, checker, ingest, kept, removed, timing, workers, bar
                    )
        bar.close()
        if ingest.documents == 0:
            skipped = "; ".join(
                f"{Path(f['path']).name} ({f['reason']})" for f in ingest.skipped_files[:5]
            )
            raise DataError(f"no readable documents in the inputs: {skipped}")
        report = {
            "format": REPORT_FORMAT,
            "documents": {
                "read": ingest.documents,
                "kept": sum(c["kept"] for c in per_source.values()),
                "removed": dict(sorted(checker.removed.items())),
            },
            "sources": per_source,
            "benchmarks": index.stats,
            "ingest": ingest.to_dict(),
            "config": dataclasses.asdict(config),
            "index_bytes": index.nbytes,
            "seconds": {
                "index": round(index_seconds, 2),
                "check": round(timing.check_seconds, 2),
                "total": round(time.perf_counter() - started, 2),
            },
            "check_mb_per_s": round(timing.text_bytes / 1e6 / max(timing.check_seconds, 1e-9), 2),
        }
        (tmp / "report.json").write_text(
            json.dumps(report, ensure_ascii=False, indent=2) + "\n", **JSONL
        )
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _check_source(
    source: Source,
    checker: Decontaminator,
    ingest: IngestReport,
    kept,
    removed,
    timing: Timing,
    workers: int,
    bar,
) -> dict:
    """Check one source a file at a time; write kept and removed documents; its counts."""
    counts = {"read": 0, "kept": 0, "removed": Counter()}
    for docs in read_documents(source, ingest, workers=workers):
        start = time.perf_counter()
        matches = checker.check([normalize(d.text) for d in docs])
        timing.check_seconds += time.perf_counter() - start
        timing.text_bytes += sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs)
        for doc, match in zip(docs, matches):
            record = {"id": doc.id, "language": doc.language}
            if match is None:
                kept.write(json.dumps({**record, "text": doc.text}, ensure_ascii=False) + "\n")
                counts["kept"] += 1
            else:
                why = {"benchmark": match.benchmark, "window": match.window}
                removed.write(
                    json.dumps({"source": source.name, **record, **why}, ensure_ascii=False) + "\n"
                )
                counts["removed"][match.benchmark] += 1
        counts["read"] += len(docs)
        bar.update(len(docs))
    return {**counts, "removed": dict(sorted(counts["removed"].items()))}


def _check_replaceable(out: Path) -> None:
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())
    ):
        raise DataError(
            f"{out}: exists and is not a decontamination output (no report.json); refusing to replace it"
        )


def _replace(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
