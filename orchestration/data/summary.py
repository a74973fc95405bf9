"""`hanyeong data inspect`: a dataset's documents, tokens and drops per source, language and rule."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def summary(manifest: dict) -> dict:
    """Counts from a manifest: per source, per language, and drops per rule (by source)."""
    sources, languages, drops = {}, {}, {}
    for name, src in manifest["sources"].items():
        sources[name] = {
            "read": src.get("read", src["documents"]),
            "documents": src["documents"],
            "tokens": src["tokens"],
            "shards": len(src["shards"]),
            "dropped": sum(src.get("dropped", {}).values()),
        }
        for lang, counts in src.get("languages", {}).items():
            entry = languages.setdefault(lang, Counter())
            entry.update(
                {
                    "read": counts.get("read", 0),
                    "documents": counts.get("kept", 0),
                    "tokens": counts.get("tokens", 0),
                }
            )
        for reason, n in src.get("dropped", {}).items():
            drops.setdefault(reason, {})[name] = n
    totals = {
        k: sum(s[k] for s in sources.values())
        for k in ("read", "documents", "tokens", "shards", "dropped")
    }
    return {
        "sources": sources,
        "languages": {k: dict(v) for k, v in sorted(languages.items())},
        "drops": dict(sorted(drops.items())),
        "totals": totals,
        "content_hash": manifest.get("content_hash"),
        "tokenizer": manifest.get("tokenizer"),
    }


def print_dataset(manifest: dict, path: Path) -> None:
    """Rich tables of `summary(manifest)`."""
    from rich.console import Console
    from rich.table import Table

    s = summary(manifest)
    console = Console()
    tok = s["tokenizer"] or {}
    console.print(
        f"[bold]{path}[/bold]  tokenizer {tok.get('path')} ({tok.get('vocab_size', 0):,} ids, "
        f"BOS {tok.get('bos_id')}, EOS {tok.get('eos_id')})  content hash {str(s['content_hash'])[:16]}"
    )

    table = Table(title="sources")
    for column in ("source", "read", "kept", "dropped", "tokens", "shards"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for name, src in [*s["sources"].items(), ("total", s["totals"])]:
        table.add_row(
            name,
            f"{src['read']:,}",
            f"{src['documents']:,}",
            f"{src['dropped']:,}",
            f"{src['tokens']:,}",
            str(src["shards"]),
            style="bold" if name == "total" else None,
        )
    console.print(table)

    table = Table(title="languages")
    for column in ("language", "read", "kept", "tokens"):
        table.add_column(column, justify="left" if column == "language" else "right")
    for lang, counts in s["languages"].items():
        table.add_row(
            lang, f"{counts['read']:,}", f"{counts['documents']:,}", f"{counts['tokens']:,}"
        )
    console.print(table)

    if s["drops"]:
        table = Table(title="drops by rule")
        table.add_column("step:reason")
        table.add_column("total", justify="right")
        table.add_column("by source, largest first", overflow="fold")
        for reason, by_source in s["drops"].items():
            ranked = sorted(by_source.items(), key=lambda kv: -kv[1])
            table.add_row(
                reason, f"{sum(by_source.values()):,}", ", ".join(f"{n} {c:,}" for n, c in ranked)
            )
        console.print(table)
    ingest = next((st for st in manifest.get("steps", []) if st["step"] == "ingest"), None)
    if ingest and ingest["files_skipped"]:
        console.print(f"files skipped ({len(ingest['files_skipped'])}):")
        for f in ingest["files_skipped"]:
            console.print(f"  {f['path']}: {f['reason']}", markup=False)
    if ingest and ingest["records_skipped"]:
        console.print(
            "records skipped: "
            + ", ".join(f"{k} {v:,}" for k, v in ingest["records_skipped"].items())
        )
