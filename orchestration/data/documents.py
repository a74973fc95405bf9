"""Ingest: inputs -> named sources -> documents (id, source, language, text).

Files are read by `tokenizer.corpus`, the reader the tokenizer trainer uses, so both accept the same
inputs and skip the same bad files and records, by name and with a reason. A source is named after
its input: a file by its stem, a folder by each top-level entry under it (sub-folder name or file
stem); `[[sources]]` in the config names its own.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hanyeong.errors import ConfigError
from tokenizer.corpus import FileReport, TextFields, expand_paths, read_corpus
from tokenizer.language import detect_language


@dataclass(slots=True)
class Document:
    """One training document; `id` is `<path in its input>#<n>`, unique within its source."""

    id: str
    source: str
    language: str  # ko, en or other (tokenizer.language)
    text: str


@dataclass
class Source:
    """A named source: its files (each with the id prefix of its documents) and text fields."""

    name: str
    files: list[tuple[Path, str]] = field(default_factory=list)
    fields: TextFields = field(default_factory=TextFields)
    origin: str = ""


def safe_name(raw: str) -> str:
    """A path component from any name: letters, digits, `.`, `_`, `-`; never empty or hidden."""
    name = re.sub(r"[^\w.-]+", "_", unicodedata.normalize("NFC", raw)).strip("._")
    return name or "source"


def file_stem(path: Path) -> str:
    """`a.jsonl.gz` -> `a`, `train.news_title.txt` -> `train.news_title`."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem or name


def resolve_sources(
    inputs: list[str], text_fields: list[str] | None, configured=()
) -> list[Source]:
    """Sources from command-line inputs (named after them) and from `[[sources]]` entries."""
    sources: dict[str, Source] = {}

    def add(name: str, path: Path, prefix: str, fields: TextFields, origin: str) -> None:
        name = safe_name(name)
        source = sources.setdefault(name, Source(name, fields=fields, origin=origin))
        if source.origin != origin:
            raise ConfigError(
                f"source {name!r} comes from both {source.origin} and {origin}; name them with [[sources]] in the config"
            )
        source.files.append((path, prefix))

    cli_fields = TextFields.parse(text_fields)
    for raw in inputs:
        for path, rel in _files(raw):
            name = rel.parts[0] if len(rel.parts) > 1 else file_stem(path)
            add(name, path, rel.as_posix(), cli_fields, raw)
    for entry in configured:
        for raw in entry.paths:
            for path, rel in _files(raw):
                add(
                    entry.name,
                    path,
                    rel.as_posix(),
                    TextFields.parse(entry.text_fields),
                    f"[[sources]] {entry.name}",
                )
    if not sources:
        raise ConfigError("no inputs: give files or folders, or [[sources]] in the config")
    return list(sources.values())


def _files(raw: str) -> list[tuple[Path, Path]]:
    root = Path(raw).expanduser()
    files = expand_paths([root])  # DataError for a missing path or an empty folder
    return [(f, f.relative_to(root) if root.is_dir() else Path(f.name)) for f in files]


@dataclass
class IngestReport:
    """Files read, skipped (by name, with the reason) and records that could not be used."""

    files: list[dict] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0
    records: int = 0
    records_skipped: Counter = field(default_factory=Counter)

    def add(self, report: FileReport) -> None:
        self.files.append(report.to_dict())
        self.documents += report.documents
        self.bytes += report.bytes
        self.records += report.records
        self.records_skipped.update(report.skipped)

    @property
    def skipped_files(self) -> list[dict]:
        return [{"path": f["path"], "reason": f["error"]} for f in self.files if f["error"]]

    def to_dict(self) -> dict:
        return {
            "step": "ingest",
            "files": len(self.files),
            "files_skipped": self.skipped_files,
            "records": self.records,
            "records_skipped": dict(sorted(self.records_skipped.items())),
            "documents": self.documents,
            "bytes": self.bytes,
        }


def read_documents(
    source: Source, report: IngestReport, workers: int = 1
) -> Iterator[list[Document]]:
    """The documents of a source, a file at a time, in sorted file order."""
    prefixes = {str(path): prefix for path, prefix in source.files}
    paths = [path for path, _ in source.files]
    for texts, file_report in read_corpus(paths, source.fields, workers=workers):
        report.add(file_report)
        prefix = prefixes[file_report.path]
        yield [
            Document(f"{prefix}#{i}", source.name, detect_language(t), t)
            for i, t in enumerate(texts)
        ]
