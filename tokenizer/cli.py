"""`hanyeong tokenizer ...`: train, report, encode, decode, export.

Commands parse options, make one library call and print a summary; heavy imports stay inside
the command bodies so `hanyeong --help` stays fast.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import typer

from hanyeong.errors import ConfigError, DataError
from tokenizer.sampling import SampleConfig
from tokenizer.train import DEFAULT_MORPHEMES, TrainConfig, default_cache_dir

app = typer.Typer(help="Train, inspect and use the Korean/English byte-level BPE tokenizer.", no_args_is_help=True)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str | None) -> int | None:
    """'500MB', '2G', '1000000' -> bytes (decimal units)."""
    if text is None:
        return None
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"--max-bytes: cannot read {text!r} as a size (e.g. 500MB, 2G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1000 ** "_kmgt".index(unit or "_"))


def _workers(workers: int | None) -> int:
    return max(1, workers or os.cpu_count() or 1)


TextFieldOption = typer.Option(
    None,
    "--text-field",
    "--text-column",
    help="Field or column holding text; dotted paths (a.b) reach nested records, `*` every value. "
    "Repeat for several. Default: text.",
)


@app.command()
def train(
    corpus: list[Path] = typer.Argument(..., help="Files or folders: .txt, .jsonl, .json, .csv, .tsv, .parquet (optionally .gz)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write tokenizer.json, tokenizer_config.json, report.json/.md."),
    vocab_size: int = typer.Option(TrainConfig.vocab_size, help="Ids in the vocabulary, special block included."),
    engine: str = typer.Option(TrainConfig.engine, help="hf: tokenizers BpeTrainer with Kiwi boundaries; kiwi: kiwipiepy's bpe_trainer."),
    morphemes: str = typer.Option(
        ",".join(DEFAULT_MORPHEMES),
        help="Kiwi tag prefixes to cut from their neighbours: E (stems from endings), J (particles), XSV...; "
        "default none (plain BBPE, measured best on held-out text).",
    ),
    no_morphemes: bool = typer.Option(False, "--no-morphemes", help="Plain byte-level BPE: no Kiwi boundaries."),
    keep_whole: int = typer.Option(
        TrainConfig.keep_whole, help="Hangul runs seen at least this often are not cut (frequent words may be one token)."
    ),
    digits: str = typer.Option(TrainConfig.digits, help="1: each digit a token (EXAONE); 3: up to three digits (Llama 3)."),
    ko_share: float = typer.Option(SampleConfig.ko_share, help="Target Korean share of the training bytes (0-1)."),
    natural_mix: bool = typer.Option(False, "--natural-mix", help="Keep the corpus's own language mix (ignores --ko-share)."),
    max_bytes: str = typer.Option(None, help="Training byte budget, e.g. 500MB (default: all the balance allows)."),
    source_cap: float = typer.Option(
        SampleConfig.source_cap, help="Most one source (a folder of the inputs) may take of its side's training bytes (0-1]."
    ),
    no_source_cap: bool = typer.Option(False, "--no-source-cap", help="No per-source cap."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Glob of input files to leave out, e.g. '*/rust-rfcs/*'; repeatable."),
    seed: int = typer.Option(0, help="Seeds sampling and the held-out split."),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="Keep exact duplicate documents."),
    text_field: list[str] = TextFieldOption,
    compare: list[str] = typer.Option(None, "--compare", help="Peer tokenizers to add to the report (any format)."),
    workers: int = typer.Option(None, help="Processes/threads to use (default: all cores)."),
    cache_dir: Path = typer.Option(None, help="Where Kiwi analyses are cached (default: ~/.cache/hanyeong)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the Kiwi cache."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a byte-level BPE tokenizer and report its compression on held-back text."""
    from tokenizer.morphemes import parse_categories
    from tokenizer.report import print_tables
    from tokenizer.train import train_tokenizer

    config = TrainConfig(
        vocab_size=vocab_size,
        engine=engine,
        morphemes=() if no_morphemes else parse_categories(morphemes),
        keep_whole=keep_whole,
        digits=digits,
        sample=SampleConfig(
            ko_share=None if natural_mix else ko_share,
            max_bytes=parse_size(max_bytes),
            seed=seed,
            dedup=not no_dedup,
            source_cap=None if no_source_cap else source_cap,
        ),
        text_fields=tuple(text_field or ("text",)),
        exclude=tuple(exclude or ()),
    )
    result = train_tokenizer(
        [str(p) for p in corpus],
        out,
        config,
        workers=_workers(workers),
        progress=not quiet,
        cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
        compare=compare or [],
    )
    report = result.report
    print_tables(report["compression"])
    sample = report["sample"]
    typer.echo(
        f"wrote {out}/tokenizer.json: {report['vocab_size']:,} ids, {report['merges']:,} merges, trained on "
        f"{sum(sample['train'].values()) / 1e6:,.1f} MB (Korean {sample['train_ko_share']:.0%}) in "
        f"{sum(report['seconds'].values()):.0f} s; skipped {report['files_skipped']} files, "
        f"{report['records_skipped']:,} records (see report.md)"
    )


@app.command()
def report(
    tokenizer: str = typer.Option(..., "--tokenizer", "-t", help="Tokenizer to measure (any supported format)."),
    text: list[Path] = typer.Option(..., "--text", help="Text files to measure on (same formats as train)."),
    compare: list[str] = typer.Option(None, "--compare", help="Peer tokenizers: tokenizer.json, vocab.json+merges.txt, *.tiktoken, *.model."),
    text_field: list[str] = TextFieldOption,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    plot_path: Path = typer.Option(None, "--plot", help="Also write a PNG of tokens per word."),
    workers: int = typer.Option(None, help="Threads for Kiwi (default: all cores)."),
) -> None:
    """Compression of a tokenizer (and peers) on texts: tokens/word, chars and bytes per token, morpheme alignment."""
    from tokenizer.corpus import TextFields, read_file
    from tokenizer.language import detect_language
    from tokenizer.report import compression_report, plot, print_tables

    fields = TextFields.parse(text_field)
    texts = []
    for path in text:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        docs, file_report = read_file(path, fields)
        if not docs:
            raise DataError(f"{path}: {file_report.error or 'no text'}")
        counts: dict[str, int] = {}
        for doc in docs[:2000]:
            counts[detect_language(doc)] = counts.get(detect_language(doc), 0) + len(doc)
        texts.append((path.name, max(counts, key=counts.get), docs))
    result = compression_report(tokenizer, texts, compare=compare or [], workers=_workers(workers))
    if plot_path:
        plot(result, plot_path)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print_tables(result)
        if plot_path:
            typer.echo(f"wrote {plot_path}")


def _read_input(path: Path | None) -> bytes:
    return sys.stdin.buffer.read() if path is None or str(path) == "-" else path.read_bytes()


@app.command()
def encode(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="A trained tokenizer directory or tokenizer.json."),
    input: Path = typer.Argument(None, help="Text file (default: stdin)."),
    npy: Path = typer.Option(None, "--npy", help="Write all ids as one int32 .npy array instead of text."),
    whole: bool = typer.Option(False, "--whole", help="Encode the input as one text (newlines included), not line by line."),
) -> None:
    """Text to ids: one line of space-separated ids per input line (or one array with --npy)."""
    from hanyeong.files import write_atomic
    from tokenizer.bbpe import BBPETokenizer

    tok = BBPETokenizer.load(tokenizer)
    data = _read_input(input)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"input is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})") from None
    if npy is not None or whole:
        ids = tok.encode(text)
        if npy is not None:
            import io

            import numpy as np

            buffer = io.BytesIO()
            np.save(buffer, np.asarray(ids, dtype=np.int32))
            write_atomic(npy, buffer.getvalue())
            typer.echo(f"wrote {len(ids):,} ids to {npy}", err=True)
        else:
            typer.echo(" ".join(map(str, ids)))
        return
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = sys.stdout
    for ids in tok.encode_batch(lines):
        out.write(" ".join(map(str, ids)) + "\n")


@app.command()
def decode(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="A trained tokenizer directory or tokenizer.json."),
    input: Path = typer.Argument(None, help="Ids as text (one sequence per line) or a .npy file (default: stdin)."),
    skip_special: bool = typer.Option(False, "--skip-special", help="Leave special tokens out of the text."),
) -> None:
    """Ids to text: each line of ids becomes a line of text (a .npy array becomes one text)."""
    from tokenizer.bbpe import BBPETokenizer

    tok = BBPETokenizer.load(tokenizer)
    if input is not None and input.suffix == ".npy":
        import numpy as np

        try:
            ids = np.load(input, allow_pickle=False)
        except ValueError as err:
            raise DataError(f"{input}: not a numeric .npy array ({err})") from None
        sys.stdout.write(tok.decode(ids.reshape(-1).tolist(), skip_special))
        return
    for number, line in enumerate(_read_input(input).decode("utf-8", "replace").splitlines(), 1):
        try:
            ids = [int(x) for x in line.split()]
        except ValueError:
            raise DataError(f"line {number}: ids must be integers separated by spaces") from None
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise DataError(f"line {number}: id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
        sys.stdout.write(tok.decode(ids, skip_special) + "\n")


@app.command()
def export(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="A trained tokenizer directory or tokenizer.json."),
    format: str = typer.Option("tiktoken", "--format", help="Export format: tiktoken."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for tokenizer.tiktoken and tiktoken_config.json."),
) -> None:
    """Export the tokenizer in another format that encodes identically."""
    from tokenizer.bbpe import BBPETokenizer
    from tokenizer.export import export_tiktoken

    if format != "tiktoken":
        raise ConfigError(f"--format: only 'tiktoken' is supported, got {format!r}")
    export_tiktoken(BBPETokenizer.load(tokenizer), out)
    typer.echo(f"wrote {out}/tokenizer.tiktoken and tiktoken_config.json "
               "(load with tokenizer.export.load_tiktoken_encoding)")
