"""Read documents from corpora: txt, jsonl, json, csv/tsv and parquet files, each optionally .gz.

A document is one string: a line of a .txt file, or one string that a text-field path reaches in a
record (a JSON line, an item of a JSON array, a CSV row, a Parquet row). Every file or record that
cannot be used is counted with its reason in a `FileReport`; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import io
import json
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hanyeong.errors import DataError

FORMATS = {
    ".txt": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
# Formats we recognise but do not read as documents; named so the skip line says why.
UNSUPPORTED = {
    ".conllu": "CoNLL-U",
    ".conll": "CoNLL",
    ".zip": "zip archive",
    ".tar": "tar archive",
    ".pdf": "PDF",
    ".arrow": "Arrow IPC",
}
SNIFF_BYTES = 1 << 16
# csv's default 128 KiB field limit is too small for whole documents in one cell.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class FileReport:
    """What reading one file produced: documents, records, and every skip with its reason."""

    path: str
    format: str
    records: int = 0
    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> records skipped
    error: str | None = None  # why the whole file (or its rest) could not be read

    @property
    def skipped_records(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("path", "format", "records", "documents", "bytes")}
        out["skipped"] = dict(self.skipped)
        out["error"] = self.error
        return out


@dataclass(frozen=True)
class TextFields:
    """Dotted paths to the text of a record (`a.b`); `*` takes every value of an object.

    Lists met on the way are walked item by item, so `data.paragraphs.context` reaches every
    paragraph of a SQuAD-style file. Each string reached is one document.
    """

    paths: tuple[tuple[str, ...], ...] = (("text",),)

    @classmethod
    def parse(cls, specs: Iterable[str] | None) -> TextFields:
        specs = [s for s in (specs or []) if s.strip()] or ["text"]
        return cls(tuple(tuple(part for part in spec.strip().split(".")) for spec in specs))

    def describe(self) -> str:
        return ", ".join(repr(".".join(p)) for p in self.paths)

    @property
    def top_level(self) -> set[str]:
        return {p[0] for p in self.paths}

    def extract(self, record: object) -> list[str]:
        """Every string the paths reach in `record`; a bare string record is its own text."""
        if isinstance(record, str):
            return [record]
        found: list[str] = []
        for path in self.paths:
            _walk(record, path, found)
        return found


def _walk(value: object, keys: tuple[str, ...], found: list[str]) -> None:
    if isinstance(value, list):
        for item in value:
            _walk(item, keys, found)
    elif not keys:
        if isinstance(value, str):
            found.append(value)
    elif isinstance(value, dict):
        key, rest = keys[0], keys[1:]
        if key == "*":
            for item in value.values():
                _walk(item, rest, found)
        elif key in value:
            _walk(value[key], rest, found)


class _FileSkipped(Exception):
    """Raised inside a format reader: the file (or the rest of it) cannot be read."""


def detect_format(path: Path) -> tuple[str, bool]:
    """(format, gzipped) from the file name; unknown suffixes are sniffed later as text."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in FORMATS:
        return FORMATS[last], gzipped
    if last in UNSUPPORTED:
        return "unsupported", gzipped
    return "unknown", gzipped


def expand_paths(paths: Iterable[str | Path], exclude: Iterable[str] = ()) -> list[Path]:
    """Files named directly, plus every non-hidden file under named folders, in sorted order.

    `exclude` holds glob patterns (`*/rust-rfcs/*`, `*.csv`) matched against each file's path as
    written from the input; a matching file is left out.
    """
    exclude = tuple(exclude)
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{raw}: no such file or folder")
    kept = [f for f in files if not any(fnmatch.fnmatch(f.as_posix(), pattern) for pattern in exclude)]
    if not kept:
        what = "left after --exclude" if files else "under"
        raise DataError(f"no input files {what} {', '.join(map(str, paths))}")
    return kept


def source_namer(paths: Iterable[str | Path]) -> Callable[[Path], str]:
    """Names a file's source: its folder, written from the folder that holds all the inputs.

    Inputs `data/ko data/en` give `ko/law`, `en/mdn`, ...; a file directly in that folder is a
    source of its own, named by its stem. A corpus laid out a dataset per folder gets a source
    per dataset, which is what the per-source cap of the sampler weighs.
    """
    parents = [Path(p).expanduser().resolve().parent for p in paths]
    base = Path(os.path.commonpath(parents)) if parents else Path.cwd()

    def name(path: Path) -> str:
        folder = path.expanduser().resolve().parent.relative_to(base).as_posix()
        if folder != ".":
            return folder
        stem = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
        return Path(stem).stem or stem

    return name


def _open_binary(path: Path, gzipped: bool):
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _sniff_utf8(head: bytes) -> None:
    """Refuse a file whose first 64 KiB are not UTF-8 (binary, UTF-16, EUC-KR...)."""
    if not head.strip():
        raise _FileSkipped("empty")
    if b"\x00" in head:
        raise _FileSkipped("not UTF-8 text (contains NUL bytes; binary or UTF-16?)")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # a multibyte character cut by the sniff window is fine
            raise _FileSkipped(f"not valid UTF-8 (byte 0x{head[err.start]:02x} at offset {err.start})")


def _lines(path: Path, gzipped: bool) -> Iterator[bytes]:
    with _open_binary(path, gzipped) as f:
        head = f.read(SNIFF_BYTES)
        _sniff_utf8(head)
        stream = io.BufferedReader(_Prepend(head, f)) if head else f
        first = True
        for line in stream:
            if first:
                line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 BOM
                first = False
            yield line


class _Prepend(io.RawIOBase):
    """A raw stream that replays already-read bytes before the rest of a file."""

    def __init__(self, head: bytes, rest):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_txt(path: Path, gzipped: bool, fields: TextFields, report: FileReport) -> Iterator[object]:
    for raw in _lines(path, gzipped):
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            report.records += 1
            report.skipped["invalid UTF-8 line"] += 1


def _read_jsonl(path: Path, gzipped: bool, fields: TextFields, report: FileReport) -> Iterator[object]:
    parsed_any = False
    for raw in _lines(path, gzipped):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            if not parsed_any and raw.lstrip().startswith(b"["):
                # A whole JSON array saved under .jsonl: read it as one JSON document.
                yield from _read_json(path, gzipped, fields, report)
                return
            report.records += 1
            report.skipped["invalid JSON line"] += 1
            continue
        parsed_any = True
        yield record


def _read_json(path: Path, gzipped: bool, fields: TextFields, report: FileReport) -> Iterator[object]:
    with _open_binary(path, gzipped) as f:
        data = f.read()
    _sniff_utf8(data[:SNIFF_BYTES])
    try:
        root = json.loads(data)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several JSON values one after another: JSON Lines
            yield from _read_jsonl(path, gzipped, fields, report)
            return
        raise _FileSkipped(f"not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError as err:
        raise _FileSkipped(f"not valid UTF-8 (offset {err.start})") from None
    if isinstance(root, list):
        yield from root
    elif isinstance(root, dict) and not fields.extract(root) and len(root) > 1:
        # {"id": {...record...}, ...}: an object of records keyed by id.
        if all(isinstance(v, dict) for v in root.values()):
            yield from root.values()
        else:
            yield root
    else:
        yield root


def _read_delimited(
    path: Path, gzipped: bool, fields: TextFields, report: FileReport, delimiter: str
) -> Iterator[object]:
    with _open_binary(path, gzipped) as f:
        head = f.read(SNIFF_BYTES)
        _sniff_utf8(head)
        text = io.TextIOWrapper(
            io.BufferedReader(_Prepend(head, f)), encoding="utf-8-sig", errors="strict", newline=""
        )
        # TSV files in the wild rarely quote and often contain stray quotes: read them literally.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(text, delimiter=delimiter, quoting=quoting)
        try:
            columns = reader.fieldnames or []
            if not fields.top_level & set(columns):
                shown = ", ".join(columns[:12]) + (", ..." if len(columns) > 12 else "")
                raise _FileSkipped(f"no column {fields.describe()} (columns: {shown})")
            yield from reader
        except (csv.Error, UnicodeDecodeError) as err:
            raise _FileSkipped(f"stopped at line {reader.line_num}: {err}") from None


def _read_csv(path, gzipped, fields, report):
    return _read_delimited(path, gzipped, fields, report, ",")


def _read_tsv(path, gzipped, fields, report):
    return _read_delimited(path, gzipped, fields, report, "\t")


def _read_parquet(path: Path, gzipped: bool, fields: TextFields, report: FileReport) -> Iterator[object]:
    import pyarrow.parquet as pq  # imported here: only Parquet inputs pay for it

    source = gzip.open(path, "rb") if gzipped else str(path)
    try:
        parquet = pq.ParquetFile(source)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise _FileSkipped(f"not a Parquet file ({err})") from None
    columns = [c for c in parquet.schema_arrow.names if c in fields.top_level]
    if not columns:
        names = ", ".join(parquet.schema_arrow.names[:12])
        raise _FileSkipped(f"no column {fields.describe()} (columns: {names})")
    for batch in parquet.iter_batches(columns=columns, batch_size=4096):
        yield from batch.to_pylist()


def _read_unknown(path: Path, gzipped: bool, fields: TextFields, report: FileReport) -> Iterator[object]:
    # An unknown suffix (.ko, .en, no suffix) that sniffs as UTF-8 text is read as .txt.
    report.format = "txt (by content)"
    yield from _read_txt(path, gzipped, fields, report)


READERS: dict[str, Callable[..., Iterator[object]]] = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
    "unknown": _read_unknown,
}


def _field_names(record: object) -> list[str]:
    return list(record.keys())[:12] if isinstance(record, dict) else [type(record).__name__]


def read_file(path: Path, fields: TextFields) -> tuple[list[str], FileReport]:
    """All documents of one file, and the report of what was read and skipped."""
    fmt, gzipped = detect_format(path)
    report = FileReport(path=str(path), format=fmt + (".gz" if gzipped else ""))
    docs: list[str] = []
    if fmt == "unsupported":
        report.error = f"unsupported format ({UNSUPPORTED[path.suffixes[-2 if gzipped else -1].lower()]})"
        return docs, report
    seen_fields: list[str] | None = None
    try:
        if path.stat().st_size == 0:
            raise _FileSkipped("empty")
        for record in READERS[fmt](path, gzipped, fields, report):
            report.records += 1
            texts = fields.extract(record)
            if not texts:
                report.skipped["no text field"] += 1
                seen_fields = seen_fields or _field_names(record)
                continue
            kept = 0
            for text in texts:
                if text.strip():
                    docs.append(text)
                    report.bytes += len(text.encode("utf-8", "surrogatepass"))
                    kept += 1
            if not kept:
                report.skipped["empty text"] += 1
    except _FileSkipped as err:
        report.error = str(err)
    except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt gzip, I/O errors
        report.error = f"unreadable ({type(err).__name__}: {err})"
    report.documents = len(docs)
    if not docs and report.error is None:
        if report.skipped.get("no text field"):
            report.error = f"no field {fields.describe()} (fields: {', '.join(seen_fields or [])})"
        elif report.skipped.get("invalid JSON line"):
            report.error = "not JSON Lines (no line parses as JSON)"
        else:
            report.error = "no text"
    return docs, report


def _read_file_task(args: tuple[Path, TextFields]) -> tuple[list[str], FileReport]:
    return read_file(*args)


def read_corpus(
    paths: Iterable[str | Path],
    fields: TextFields | None = None,
    workers: int = 1,
    progress: bool = False,
    exclude: Iterable[str] = (),
) -> Iterator[tuple[list[str], FileReport]]:
    """Yield (documents, report) per file, in sorted path order, reading files in `workers` processes."""
    fields = fields or TextFields()
    files = expand_paths(paths, exclude)
    tasks = [(path, fields) for path in files]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="read", unit="file", file=sys.stderr)
    if workers > 1 and len(files) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(files))) as pool:
            for result in pool.imap(_read_file_task, tasks):  # imap keeps the order: deterministic
                if bar:
                    bar.update()
                yield result
    else:
        for task in tasks:
            result = _read_file_task(task)
            if bar:
                bar.update()
            yield result
    if bar:
        bar.close()
