"""`prepare_chat`: conversation files -> a chat dataset (the shard contract plus loss_mask).

    DATASET/manifest.json                       format "hanyeong-dataset", kind "chat", sources, shards,
                                                inputs_hash / content_hash as `hanyeong data prepare`
    DATASET/shards/<source>/part-00000.parquet  id, language, input_ids list<int32> (BOS ... EOS),
                                                loss_mask list<int8> (orchestration/data/chat.py)

Records are read by the corpus reader the tokenizer uses (jsonl, json, csv, tsv, parquet, .gz), so
the same files are accepted; every record that is not a usable conversation is counted under its
reason, and exact repeats are dropped. A re-run over unchanged inputs is a no-op.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from hanyeong.errors import DataError
from orchestration.data.chat import ChatConfig, conversation, encode, render


def write_shard(path: Path, ids: list[str], languages: list[str], input_ids: list[np.ndarray],
                loss_masks: list[np.ndarray] | None, compression: str = "zstd") -> dict:  # fmt: skip
    """One Parquet shard of the dataset contract (+ loss_mask when given); returns its manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hanyeong.files import write_atomic

    lengths = np.array([len(x) for x in input_ids], np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns = {"id": pa.array(ids, pa.string()), "language": pa.array(languages, pa.string()),
               "input_ids": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(input_ids)))}  # fmt: skip
    if loss_masks is not None:
        columns["loss_mask"] = pa.ListArray.from_arrays(
            offsets, pa.array(np.concatenate(loss_masks))
        )
    sink = pa.BufferOutputStream()
    pq.write_table(
        pa.table(columns), sink, compression=None if compression == "none" else compression
    )
    data = sink.getvalue().to_pybytes()
    write_atomic(path, data)
    entry = {"documents": len(ids), "tokens": int(lengths.sum()), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    if loss_masks is not None:
        entry["trained_tokens"] = int(sum(int(m.sum()) for m in loss_masks))
    return entry


def read_records(source, fields, parse, ingest, dropped: Counter, tag: str) -> list[tuple[str, object]]:
    """(id, parse(record)) of every usable record of a source's files (`fields`: a TextFields of
    what to read); `parse(record) -> (value, reason)`, a record with a reason is skipped and counted
    by it (in the file's report and as "{tag}:{reason}" in `dropped`); unreadable files by name."""

    from tokenizer.corpus import READERS, FileReport, _FileSkipped, detect_format

    out = []
    for path, prefix in source.files:
        fmt, gzipped = detect_format(path)
        report = FileReport(path=str(path), format=fmt + (".gz" if gzipped else ""))
        try:
            if fmt not in READERS:
                raise _FileSkipped(f"unsupported format {fmt}")
            for i, record in enumerate(READERS[fmt](path, gzipped, fields, report)):
                report.records += 1
                value, reason = parse(record)
                if reason is not None:
                    report.skipped[reason] += 1
                    dropped[f"{tag}:{reason}"] += 1
                    continue
                out.append((f"{prefix}#{i}", value))
                report.documents += 1
        except _FileSkipped as err:
            report.error = str(err)
        except (OSError, EOFError, zlib.error) as err:
            report.error = f"unreadable ({type(err).__name__}: {err})"
        ingest.add(report)
    return out


def read_conversations(
    source, config: ChatConfig, ingest, dropped: Counter
) -> list[tuple[str, list[dict]]]:
    """(id, messages) of every usable record of a source's files; each skip counted by reason."""
    from tokenizer.corpus import TextFields

    fields = TextFields(tuple((name,) for name in config.fields))
    return read_records(source, fields, lambda r: conversation(r, config), ingest, dropped, "chat")


def prepare_chat(inputs: list[str], tokenizer: str | Path, out: str | Path, config: ChatConfig | None = None,
                 force: bool = False) -> dict:  # fmt: skip
    """Build the chat dataset `out` from `inputs`; returns its manifest (a no-op when up to date).

    Sources are named as `hanyeong data prepare` names them: a file by its stem, a folder by each
    top-level entry under it.
    """
    from orchestration.data import manifest as mf
    from orchestration.data.chat import template_of
    from orchestration.data.documents import IngestReport, resolve_sources
    from orchestration.data.shards import tokenizer_info
    from tokenizer.bbpe import BBPETokenizer

    config, out, started = config or ChatConfig(), Path(out), time.perf_counter()
    sources = resolve_sources(list(inputs), None)
    tok = tokenizer_info(tokenizer)
    files = [str(path) for s in sources for path, _ in s.files]
    fingerprint = mf.inputs_hash({"chat": config.to_dict(), "template": template_of(config)}, files, tok)
    if not force and (existing := mf.up_to_date(out, fingerprint)) is not None:
        return {**existing, "up_to_date": True}
    mf.check_replaceable(out)
    tokenizer_object, ingest = BBPETokenizer.load(tokenizer), IngestReport()
    tmp = mf.staging_dir(out)
    try:
        entries, seen = {}, set()
        for source in sources:
            entries[source.name] = _prepare_source(
                source, config, tokenizer_object, ingest, seen, tmp
            )
        if not any(e["documents"] for e in entries.values()):
            raise DataError(
                f"no conversations in {', '.join(map(str, inputs))}: {dict(ingest.records_skipped)}"
            )
        manifest = _manifest(entries, ingest, tok, config, fingerprint)
        manifest["seconds"] = {"total": round(time.perf_counter() - started, 2)}
        mf.publish(tmp, out, manifest)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _prepare_source(source, config: ChatConfig, tokenizer, ingest, seen: set, root: Path) -> dict:
    from tokenizer.language import detect_language

    dropped: Counter = Counter()
    records = read_conversations(source, config, ingest, dropped)
    kept = []
    for record_id, messages in records:
        # reasoning: the trace form (the last thought kept), so traces with one answer stay apart
        text = render(messages, reasoning=config.reasoning, keep_last_thought=config.reasoning)
        key = hashlib.sha256(text.encode("utf-8")).digest()
        if config.dedup and key in seen:
            dropped["dedup:duplicate"] += 1
            continue
        seen.add(key)
        kept.append((record_id, messages))
    languages = [detect_language("\n".join(m["content"] for m in messages)) for _, messages in kept]
    encoded = encode(tokenizer, [messages for _, messages in kept], reasoning=config.reasoning)
    shards, step = [], config.documents_per_shard
    for part, start in enumerate(range(0, len(kept), step)):
        rel = f"shards/{source.name}/part-{part:05d}.parquet"
        chunk = slice(start, start + step)
        entry = write_shard(root / rel, [i for i, _ in kept[chunk]], languages[chunk],
                            [ids for ids, _ in encoded[chunk]], [m for _, m in encoded[chunk]],
                            config.compression)  # fmt: skip
        shards.append({"path": rel, **entry})
    by_language: dict[str, dict] = {}
    for language, (ids, _) in zip(languages, encoded):
        entry = by_language.setdefault(language, {"kept": 0, "tokens": 0})
        entry["kept"] += 1
        entry["tokens"] += len(ids)
    return {"documents": len(kept), "tokens": sum(s["tokens"] for s in shards),
            "trained_tokens": sum(s["trained_tokens"] for s in shards), "shards": shards,
            "read": len(records) + sum(v for k, v in dropped.items() if k.startswith("chat:")),
            "dropped": dict(sorted(dropped.items())), "languages": by_language}  # fmt: skip


def _manifest(sources: dict, ingest, tok: dict, config: ChatConfig, fingerprint: str) -> dict:
    from orchestration.data import manifest as mf
    from orchestration.data.chat import template_of

    read = sum(s["read"] for s in sources.values())
    parsed = read - sum(
        n for s in sources.values() for k, n in s["dropped"].items() if k.startswith("chat:")
    )
    kept = sum(s["documents"] for s in sources.values())
    steps = [
        ingest.to_dict(),
        {"step": "chat", "documents_in": read, "documents_out": parsed},
        {"step": "dedup", "documents_in": parsed, "documents_out": kept},
        {"step": "tokenize", "documents": kept, "tokens": sum(s["tokens"] for s in sources.values()),
         "trained_tokens": sum(s["trained_tokens"] for s in sources.values()),
         "shards": sum(len(s["shards"]) for s in sources.values())},
    ]  # fmt: skip
    return {"format": mf.FORMAT, "version": mf.VERSION, "kind": "chat", "tokenizer": tok, "sources": sources,
            "steps": steps, "config": config.to_dict(), "chat_template": template_of(config),
            "inputs_hash": fingerprint, "content_hash": mf.content_hash(tok, sources)}  # fmt: skip
