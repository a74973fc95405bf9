"""Compression reports: every tokenizer on every text, as JSON, Markdown, a table and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tokenizer.metrics import hangul_single_token_share, kiwi_cuts, measure
from tokenizer.peers import Peer, _hf_peer, load_peer

# Kiwi analyses ~0.1 MB/s per core: morpheme alignment is scored on a prefix of each Korean text.
ALIGNMENT_BYTES = 300_000


def as_encoder(tokenizer, name: str = "hanyeong") -> Peer:
    """A Peer for a BBPETokenizer, a Peer, or a path in any supported format."""
    if isinstance(tokenizer, Peer):
        return tokenizer
    if hasattr(tokenizer, "hf"):
        return _hf_peer(name, tokenizer.hf, "hanyeong")
    return load_peer(tokenizer)


def _prefix(documents: list[str], max_bytes: int) -> list[str]:
    out, total = [], 0
    for doc in documents:
        if total >= max_bytes:
            break
        out.append(doc)
        total += len(doc.encode("utf-8", "surrogatepass"))
    return out


def compression_report(
    tokenizer,
    texts: list[tuple[str, str, list[str]]],
    compare: list = (),
    workers: int = 1,
    alignment_bytes: int = ALIGNMENT_BYTES,
) -> dict:
    """Compression of `tokenizer` and each `compare` peer on `texts` = [(name, language, documents)].

    The first tokenizer is the baseline that relative figures refer to.
    """
    encoders = [as_encoder(tokenizer)] + [as_encoder(p) for p in compare]
    report = {"texts": [], "tokenizers": [], "results": []}
    for encoder in encoders:
        report["tokenizers"].append(
            {
                "name": encoder.name,
                "kind": encoder.kind,
                "vocab_size": encoder.vocab_size,
                "hangul_single_token_share": round(hangul_single_token_share(encoder, encoder.prefix_space), 4),
            }
        )
    for name, language, documents in texts:
        sample = _prefix(documents, alignment_bytes) if language == "ko" else []
        cuts = kiwi_cuts(sample, workers) if sample else None
        first = None
        for encoder in encoders:
            result = measure(encoder, documents, prefix_space=encoder.prefix_space).to_dict()
            if cuts is not None:
                aligned = measure(encoder, sample, cuts, prefix_space=encoder.prefix_space)
                result["morpheme_precision"] = aligned.morpheme_precision
                result["morpheme_recall"] = aligned.morpheme_recall
                result["alignment_documents"] = len(sample)
            first = first or result
            result["vs_baseline"] = result["tokens_per_word"] / first["tokens_per_word"] - 1
            report["results"].append({"text": name, "tokenizer": encoder.name, **result})
        report["texts"].append(
            {"name": name, "language": language, "documents": first["documents"], "words": first["words"], "bytes": first["bytes"]}
        )
    return report


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


COLUMNS = [
    ("tokenizer", "tokenizer", "s"),
    ("tokens/word", "tokens_per_word", ".3f"),
    ("vs first", "vs_baseline", "+.1%"),
    ("chars/token", "chars_per_token", ".2f"),
    ("bytes/token", "bytes_per_token", ".2f"),
    ("1-token words", "single_token_words", ".1%"),
    ("morpheme P", "morpheme_precision", ".1%"),
    ("morpheme R", "morpheme_recall", ".1%"),
]


def rows_by_text(compression: dict) -> list[tuple[dict, list[dict]]]:
    return [(t, [r for r in compression["results"] if r["text"] == t["name"]]) for t in compression["texts"]]


def markdown_tables(compression: dict) -> str:
    hangul = {t["name"]: t["hangul_single_token_share"] for t in compression["tokenizers"]}
    lines = []
    for text, rows in rows_by_text(compression):
        lines += [
            f"### {text['name']} ({text['language']}, {text['documents']:,} documents, {text['words']:,} words)",
            "",
        ]
        header = [c[0] for c in COLUMNS] + (["Hangul 1-token"] if text["language"] == "ko" else [])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in rows:
            cells = [row[key] if spec == "s" else _fmt(row.get(key), spec) for _, key, spec in COLUMNS]
            if text["language"] == "ko":
                cells.append(_fmt(hangul[row["tokenizer"]], ".1%"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def print_tables(compression: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))  # a pipe reports 80 columns
    hangul = {t["name"]: t["hangul_single_token_share"] for t in compression["tokenizers"]}
    for text, rows in rows_by_text(compression):
        table = Table(title=f"{text['name']} ({text['language']}, {text['words']:,} words)")
        for label, _, spec in COLUMNS:
            table.add_column(label, justify="left" if spec == "s" else "right")
        if text["language"] == "ko":
            table.add_column("Hangul 1-token", justify="right")
        for row in rows:
            cells = [row[key] if spec == "s" else _fmt(row.get(key), spec) for _, key, spec in COLUMNS]
            if text["language"] == "ko":
                cells.append(_fmt(hangul[row["tokenizer"]], ".1%"))
            table.add_row(*cells)
        console.print(table)


def plot(compression: dict, path: str | Path) -> None:
    """Grouped bars of tokens per word: one group per text, one bar per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = [t["name"] for t in compression["texts"]]
    names = [t["name"] for t in compression["tokenizers"]]
    value = {(r["text"], r["tokenizer"]): r["tokens_per_word"] for r in compression["results"]}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(texts) * max(1, len(names) / 4)), 4.5))
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(texts))]
        ax.bar(xs, [value.get((t, name), 0) for t in texts], width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(texts))], texts, rotation=15)
    ax.set_ylabel("tokens per word (lower is better)")
    ax.set_title("Compression by text and tokenizer")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def training_markdown(report: dict) -> str:
    """report.md of a training run: what was read, sampled, learned, and how well it compresses."""
    sample = report["sample"]
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    lines = [
        "# Tokenizer training report",
        "",
        f"- vocabulary: {report['vocab_size']:,} ids ({report['config']['special_block']} special, "
        f"256 bytes, {report['merges']:,} merges); engine `{report['config']['engine']}`, "
        f"morpheme cuts `{','.join(report['config']['morphemes']) or 'none'}`, digits `{report['config']['digits']}`",
        f"- read: " + ", ".join(f"{lang} {mb(n)}" for lang, n in sorted(sample["read"].items())),
        f"- duplicates dropped: " + (", ".join(f"{lang} {n:,}" for lang, n in sorted(sample["duplicates"].items())) or "none"),
        f"- trained on: " + ", ".join(f"{lang} {mb(n)}" for lang, n in sorted(sample["train"].items()))
        + f" (Korean share {sample['train_ko_share']:.1%})",
        f"- files skipped: {report['files_skipped']}; records skipped: {report['records_skipped']:,}",
        f"- seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()),
        f"- peak memory: {report['peak_rss_mb']:,} MB",
        "",
    ]
    if sample.get("sources"):
        cap = report["config"]["sample"].get("source_cap")
        lines += ["## Sources", "", f"Per-source cap: {f'{cap:.0%} of its side' if cap else 'none'}.", "",
                  "| source (side) | read | sampled | share of side |", "|---|---:|---:|---:|"]  # fmt: skip
        side_total = {}
        for row in sample["sources"].values():
            side_total[row["side"]] = side_total.get(row["side"], 0) + row["train"]
        for name, row in sorted(sample["sources"].items(), key=lambda kv: -kv[1]["read"]):
            share = row["train"] / side_total[row["side"]] if side_total[row["side"]] else 0.0
            lines.append(f"| {name} | {mb(row['read'])} | {mb(row['train'])} | {share:.1%} |")
        lines.append("")
    skipped = [f for f in report["files"] if f["error"] or f["skipped"]]
    if skipped:
        lines += ["## Skipped", ""]
        for f in skipped:
            what = f["error"] or ""
            if f["skipped"]:
                what += (" " if what else "") + ", ".join(f"{n:,} {reason}" for reason, n in f["skipped"].items())
            lines.append(f"- `{f['path']}`: {what}")
        lines.append("")
    lines += ["## Compression on held-out text", "", markdown_tables(report["compression"])]
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict) -> None:
    from hanyeong.files import write_atomic

    write_atomic(out_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=2))
    write_atomic(out_dir / "report.md", training_markdown(report))
